#!/usr/bin/env python3
"""The held-out mutation run (issue 19's bar): mutated and truncated copies of the default model,
each run as `slimchat run --model COPY --prompt hi --max-tokens 4` under `ulimit -v` 6 GiB and
`timeout 60`, every outcome classified.

Copies: most mutations land in the header (magic, version, counts, metadata keys, types, string
and array lengths, values, the tensor table's names, dimensions, types and offsets), half of
those on the parsed length/count/type/dimension/offset fields themselves with integers that
break checks; some in the tensor data (random bytes, runs of 0xff that make f16 scales NaN); the
rest are truncations at random points (most inside the header). Each copy is a function of
(--seed, its index); a copy is written to --tmp, run, and deleted before the next.

Outcomes: clean (nonzero exit, exactly one stderr line `slimchat: error: ...`), ok (exit 0 with
an answer on stdout), panic (stderr says "panicked"), signal (killed by a signal), timeout,
multi-line (an error of more than one line), silent (nonzero exit with nothing on stderr, or
exit 0 with no answer).

    python3 bench/mutation-run.py --seed 1 --copies 300 [--binary PATH] [--model PATH]
    python3 bench/mutation-run.py --seed 1 --only 17 --keep /tmp/copy17.gguf   # rebuild one copy
"""

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict

INTERESTING = [0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 256, 4096, 65535, 65536, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 60, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 2, (1 << 64) - 1]


def parse_fields(b):
    """Offsets of every field of the GGUF header as (offset, width, kind), and its end."""
    fields = []
    pos = 0

    def take(width, kind):
        nonlocal pos
        fields.append((pos, width, kind))
        v = int.from_bytes(b[pos:pos + width], "little")
        pos += width
        return v

    take(4, "magic")
    take(4, "version")
    n_tensors = take(8, "tensor count")
    n_kv = take(8, "metadata count")

    def string(kind):
        nonlocal pos
        n = take(8, kind + " length")
        pos += n

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def value(ty, kind):
        nonlocal pos
        if ty in sizes:
            fields.append((pos, sizes[ty], kind + " value"))
            pos += sizes[ty]
        elif ty == 8:
            string(kind + " string")
        elif ty == 9:
            elem = take(4, kind + " array type")
            n = take(8, kind + " array length")
            if elem in sizes and elem != 7 and n > 64:
                pos += sizes[elem] * n  # a bulk numeric array: skip it, do not list each value
            else:
                for _ in range(n):
                    value(elem, kind + " element")

    for _ in range(n_kv):
        string("key")
        ty = take(4, "value type")
        value(ty, "metadata")
    for _ in range(n_tensors):
        string("tensor name")
        nd = take(4, "tensor dims count")
        for _ in range(nd):
            take(8, "tensor dim")
        take(4, "tensor type")
        take(8, "tensor offset")
    return fields, pos


def mutate(model, fields, header_end, rng):
    """Returns (bytes of the copy, a description)."""
    kind = rng.random()
    b = bytearray(model)
    what = []
    # every kind of field gets an equal share, so the 98k token-string lengths do not drown
    # the magic, the counts, the value types and the tensor table
    by_kind = defaultdict(list)
    for f in fields:
        by_kind[f[2]].append(f)
    kinds = sorted(by_kind)

    def header_mutation():
        r = rng.random()
        if r < 0.5:
            off, width, name = rng.choice(by_kind[rng.choice(kinds)])
            v = rng.choice(INTERESTING)
            if rng.random() < 0.3:
                v = int.from_bytes(b[off:off + width], "little") + rng.randint(-64, 64)
            v %= 1 << (8 * width)
            b[off:off + width] = v.to_bytes(width, "little")
            what.append(f"{name}@{off}={v}")
        elif r < 0.75:
            off = rng.randrange(header_end)
            bit = rng.randrange(8)
            b[off] ^= 1 << bit
            what.append(f"flip@{off}.{bit}")
        else:
            off = rng.randrange(header_end)
            v = rng.randrange(256)
            b[off] = v
            what.append(f"byte@{off}={v}")

    if kind < 0.55:
        family = "header"
        for _ in range(rng.randint(1, 4)):
            header_mutation()
    elif kind < 0.70:
        family = "data"
        for _ in range(rng.randint(1, 8)):
            off = rng.randrange(header_end, len(b) - 64)
            if rng.random() < 0.5:
                n = rng.randint(1, 64)
                b[off:off + n] = b"\xff" * n
                what.append(f"ff@{off}x{n}")
            else:
                v = rng.randrange(256)
                b[off] = v
                what.append(f"byte@{off}={v}")
    elif kind < 0.92:
        family = "truncate"
        cut = rng.randrange(header_end) if rng.random() < 0.6 else rng.randrange(len(b))
        del b[cut:]
        what.append(f"cut@{cut}")
    else:
        family = "header+truncate"
        header_mutation()
        cut = rng.randrange(len(b))
        del b[cut:]
        what.append(f"cut@{cut}")
    return bytes(b), family, " ".join(what)


def classify(rc, out, err):
    lines = [l for l in err.decode("utf-8", "replace").splitlines() if l.strip()]
    if b"panicked" in err:
        return "panic"
    if rc == 124:
        return "timeout"
    if rc < 0 or rc >= 128:
        return "signal"
    if rc == 0:
        return "ok" if out.strip() else "silent"
    if not lines:
        return "silent"
    if len(lines) == 1 and lines[0].startswith("slimchat: error: "):
        return "clean"
    return "multi-line"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--copies", type=int, default=300)
    ap.add_argument("--binary", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "release", "slimchat"))
    ap.add_argument("--model", default=os.path.expanduser(
        "~/.cache/slimchat/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tmp", default="/tmp/slimchat-mutation")
    ap.add_argument("--log", help="write every case as JSON lines here")
    ap.add_argument("--only", type=int, help="only build copy N")
    ap.add_argument("--keep", help="with --only: write the copy here and do not run it")
    a = ap.parse_args()

    model = open(a.model, "rb").read()
    fields, header_end = parse_fields(model)
    os.makedirs(a.tmp, exist_ok=True)
    copy = os.path.join(a.tmp, f"copy-{os.getpid()}.gguf")
    counts = defaultdict(Counter)
    bad = []
    log = open(a.log, "w") if a.log else None
    started = time.time()
    indices = [a.only] if a.only is not None else range(a.copies)
    for i in indices:
        rng = random.Random(a.seed * 1_000_003 + i)
        data, family, what = mutate(model, fields, header_end, rng)
        if a.keep:
            open(a.keep, "wb").write(data)
            print(f"copy {i}: {family}: {what} -> {a.keep}")
            return
        open(copy, "wb").write(data)
        cmd = ["timeout", "60", "bash", "-c",
               'ulimit -v 6291456; exec "$0" run --model "$1" --prompt hi --max-tokens 4',
               a.binary, copy]
        env = dict(os.environ, SLIMCHAT_CONFIG="/nonexistent/slimchat-mutation.toml",
                   RUST_BACKTRACE="0")
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, env=env)
        took = time.time() - t0
        os.unlink(copy)
        outcome = classify(p.returncode, p.stdout, p.stderr)
        counts[family][outcome] += 1
        rec = {"copy": i, "family": family, "what": what, "rc": p.returncode, "outcome": outcome,
               "seconds": round(took, 2), "stderr": p.stderr.decode("utf-8", "replace")[-400:],
               "stdout": p.stdout.decode("utf-8", "replace")[:80]}
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if outcome not in ("clean", "ok"):
            bad.append(rec)
            print(f"copy {i} [{family}] {outcome} rc={p.returncode}: {what[:120]} :: "
                  f"{rec['stderr'].strip()[:300]}", flush=True)
    outcomes = ["clean", "ok", "panic", "signal", "timeout", "multi-line", "silent"]
    print(f"\nseed {a.seed}: {sum(sum(c.values()) for c in counts.values())} copies "
          f"in {time.time() - started:.0f} s\n")
    print("| copies | " + " | ".join(outcomes) + " |")
    print("| --- |" + " --- |" * len(outcomes))
    total = Counter()
    for fam in ["header", "data", "truncate", "header+truncate"]:
        c = counts.get(fam, Counter())
        total.update(c)
        print(f"| {fam} ({sum(c.values())}) | " + " | ".join(str(c[o]) for o in outcomes) + " |")
    print(f"| all ({sum(total.values())}) | " + " | ".join(str(total[o]) for o in outcomes) + " |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
