#!/usr/bin/env python3
"""Load on `slimchat serve`: CLIENTS concurrent streaming chat requests, ROUNDS rounds.

Starts the server itself (the binary given, on a free port) so that it can read its RSS idle
and after the load, then reports per round how many requests were answered whole, refused
with 503 (and a Retry-After) or lost (an error, a cut stream, no [DONE]), with client-side TTFT
p50/p95 of the answered ones, and the server's pruned/dense TTFT on one long document.

    bench/serve-load.py target/release/slimchat [--clients 16] [--rounds 3] [--queue 8]

Standard library only; nothing leaves 127.0.0.1.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def stream_chat(port, body, timeout=600):
    """One streaming request: ("ok", ttft_s, text) / ("busy", retry_after, "") / ("lost", why, "")."""
    start = time.monotonic()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status == 503:
            retry = resp.getheader("Retry-After")
            resp.read()
            return ("busy", retry, "") if retry else ("lost", "503 without Retry-After", "")
        if resp.status != 200:
            return ("lost", f"HTTP {resp.status}: {resp.read()[:200]!r}", "")
        ttft, text, done, final = None, [], False, None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.monotonic() - start
                    text.append(piece)
                if choice.get("finish_reason"):
                    final = chunk
        conn.close()
        if not done:
            return ("lost", "the stream ended without [DONE]", "")
        return ("ok", ttft if ttft is not None else time.monotonic() - start, "".join(text), final)
    except Exception as e:  # a reset, a timeout: counted as lost
        return ("lost", repr(e), "")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queue", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--doc-words", type=int, default=3300,
                    help="words of the long document for the pruned/dense TTFT (0 = skip)")
    args = ap.parse_args()

    proc = subprocess.Popen([args.binary, "serve", "--port", "0", "--queue", str(args.queue)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = proc.stdout.readline()
    port = int(first.rsplit(":", 1)[1].split("/")[0])
    print(first.strip())
    try:
        # one request to warm the engine, then the idle level
        stream_chat(port, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                           "stream": True})
        time.sleep(1)
        idle = rss_mib(proc.pid)
        ttfts, answered, busy, lost = [], 0, 0, []
        t0 = time.monotonic()
        for rnd in range(args.rounds):
            results = [None] * args.clients

            def client(i):
                body = {"messages": [{"role": "user", "content":
                                      f"Client {i}, round {rnd}: name three colours and a fruit."}],
                        "max_tokens": args.max_tokens, "stream": True}
                results[i] = stream_chat(port, body)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            r_ok = [r for r in results if r[0] == "ok"]
            r_busy = [r for r in results if r[0] == "busy"]
            r_lost = [r for r in results if r[0] == "lost"]
            ttfts += [r[1] for r in r_ok]
            answered += len(r_ok)
            busy += len(r_busy)
            lost += [r[1] for r in r_lost]
            print(f"round {rnd + 1}: {len(r_ok)} answered, {len(r_busy)} 503, {len(r_lost)} lost")
        wall = time.monotonic() - t0
        time.sleep(1)
        after = rss_mib(proc.pid)
        print(f"{answered} answered, {busy} refused with 503 + Retry-After, {len(lost)} lost "
              f"in {wall:.1f} s; client TTFT p50 {pct(ttfts, 50) * 1e3:.0f} ms, "
              f"p95 {pct(ttfts, 95) * 1e3:.0f} ms (queueing included)")
        for why in lost:
            print(f"  lost: {why}")
        print(f"server RSS idle {idle:.0f} MiB, after the load {after:.0f} MiB "
              f"({after / idle:.2f}x)")

        if args.doc_words:
            words = ("The ledger of the harbour office records each ship, its cargo and the "
                     "day it left. ").split()
            doc = " ".join(words[i % len(words)] for i in range(args.doc_words))
            runs = (("dense", {"enabled": False}), ("pruned", {"enabled": True}),
                    ("dense", {"enabled": False}), ("pruned", {"enabled": True}))
            for k, (name, slim) in enumerate(runs):
                # a document of its own each time: no KV shared with the run before
                question = f"Volume {k}. {doc}\n\nWhat does the ledger record?"
                r = stream_chat(port, {"messages": [{"role": "user", "content": question}],
                                       "max_tokens": 8, "stream": True, "slim": slim})
                t = r[3]["timings"] if r[0] == "ok" and r[3] else {}
                print(f"{name:6}: prompt {t.get('prompt_n')} tokens, server TTFT "
                      f"{t.get('ttft_ms', float('nan')):.0f} ms, client TTFT {r[1] * 1e3:.0f} ms")
        return 1 if lost else 0
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    sys.exit(main())
