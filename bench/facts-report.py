#!/usr/bin/env python3
"""Read `slimchat facts --json` output and print where facts were lost.

  python3 bench/facts-report.py RUN.json [OTHER.json ...]
  python3 bench/facts-report.py --against BASE.json RUN.json [OTHER.json ...]

For each run: the cells (part, length, depth band: dense and pruned accuracy, lost/gained,
agreement, TTFT ratio), every lost fact with the stage that dropped it and its blocks' ranks
per stage, and, over every fact dense found, how the fact's worst block ranked at each stage
(rank / candidates, by depth band): how close to the cut the kept facts were. Last, over every
fact asked (found by dense or not): the median and mean relative rank of its worst block at each
stage, and how many facts each stage dropped: the score's quality, less noisy than the answers.
Where a run carries each case's `disagree_at`: at which answer positions pruned and dense part
(0: the pruned prefill's own token; 1: the step that heals; later ones read every block).
With `--against BASE.json` (a run of the same part, lengths and cases: another config, or dense
with f16 KV as the yardstick), each run is compared with BASE case by case instead: at each
length the two mean agreements, their paired difference with its standard error, how many cases
changed, and the facts BASE found that the run did not and the reverse. A difference under two
standard errors is not a result.
Only the standard library is used.
"""
import json
import math
import sys

BANDS = ["0-33%", "33-66%", "66-100%"]


def cells(run):
    print(f"{'part':7} {'length':>6} {'band':8} {'asked':>5} {'dense':>6} {'slim':>6} "
          f"{'lost':>4} {'gain':>4} {'agree':>6} {'ident':>5} {'ttft':>5}")
    for c in run["cells"]:
        band = "all" if c["band"] is None else BANDS[c["band"]]
        extra = ""
        if c["band"] is None:
            ratio = c["ttft_ms_slim"] / max(c["ttft_ms_dense"], 1e-9)
            extra = f"{c['agreement']:6.3f} {c['identical']:5.2f} {ratio:5.2f}"
        acc = lambda n: n / max(c["asked"], 1)
        print(f"{c['part']:7} {c['length']:6} {band:8} {c['asked']:5} {acc(c['dense_found']):6.3f} "
              f"{acc(c['slim_found']):6.3f} {c['lost']:4} {c['gained']:4} {extra}")


def losses(run):
    print("\nlost facts (dense found, pruned did not):")
    for case in run["cases"]:
        for f in case["facts"]:
            if f["dense"] and not f["slim"]:
                d = f["diagnosis"] or {}
                ranks = " ".join("-" if r is None else f"{r[0]}/{r[1]}" for r in d.get("ranks", []))
                dec = d.get("decode_layers")
                print(f"  {case['id']:12} {case['text']:9} {case['ask']:7} {f['phrasing']:12} "
                      f"depth {f['depth']:.2f}  lost at {d.get('lost')}  ranks {ranks}  "
                      f"decode layers {dec}")


def ranks(run):
    print("\nworst block rank of facts dense found (rank/candidates at each stage), by band:")
    by = {}
    for case in run["cases"]:
        length = case.get("length") or int(case["id"].split("-")[1])
        for f in case["facts"]:
            d = f["diagnosis"]
            if not f["dense"] or not d:
                continue
            rel = ["-" if r is None else f"{r[0] / r[1]:.2f}" for r in d["ranks"]]
            by.setdefault((length, f["band"]), []).append(
                ("+" if f["slim"] else "x") + "/".join(rel))
    for (length, band), v in sorted(by.items()):
        print(f"  {length:5} {BANDS[band]:8} {' '.join(v)}")


def score_quality(run):
    print("\nevery fact asked: relative rank of its worst block at each stage (median / mean), "
          "facts dropped there:")
    by = {}
    for case in run["cases"]:
        length = case.get("length") or int(case["id"].split("-")[1])
        for f in case["facts"]:
            d = f["diagnosis"]
            if not d:
                continue
            row = by.setdefault(length, {"facts": 0, "rel": {}, "dropped": {}})
            row["facts"] += 1
            for stage, r in enumerate(d["ranks"]):
                if r is not None:
                    row["rel"].setdefault(stage, []).append(r[0] / r[1])
            lost = d.get("lost")
            if isinstance(lost, dict) and "prefill" in lost:
                row["dropped"][lost["prefill"]] = row["dropped"].get(lost["prefill"], 0) + 1
    for length, row in sorted(by.items()):
        stages = []
        for stage, rel in sorted(row["rel"].items()):
            rel = sorted(rel)
            median = rel[len(rel) // 2]
            stages.append(f"stage {stage}: {median:.2f} / {sum(rel) / len(rel):.2f}, "
                          f"dropped {row['dropped'].get(stage, 0)}")
        print(f"  {length:5} {row['facts']:3} facts  " + "; ".join(stages))


def parting(run):
    cases = [c for c in run["cases"] if "disagree_at" in c]
    if not cases:
        return
    print("\nwhere the answers part (teacher-forced top-1 misses by answer position):")
    by = {}
    for c in cases:
        row = by.setdefault(c["length"], {"cases": 0, "missed": 0, "at": [0, 0, 0, 0]})
        row["cases"] += 1
        row["missed"] += bool(c["disagree_at"])
        for p in c["disagree_at"]:
            row["at"][0 if p == 0 else 1 if p == 1 else 2 if p < 8 else 3] += 1
    for length, row in sorted(by.items()):
        first, heal, early, late = row["at"]
        print(f"  {length:5} {row['cases']:3} cases, {row['missed']} with a miss; misses at "
              f"0: {first}, 1: {heal}, 2-7: {early}, 8 on: {late}")


def against(base, run):
    by_id = {c["id"]: c for c in base["cases"]}
    by_length = {}
    for case in run["cases"]:
        other = by_id.get(case["id"])
        if other is not None:
            by_length.setdefault(case["length"], []).append((other, case))
    print(f"{'length':>6} {'cases':>5} {'base':>6} {'run':>6} {'paired diff':>16} {'changed':>7} "
          f"{'found':>7} {'lost':>4} {'gained':>6}")
    for length, pairs in sorted(by_length.items()):
        d = [c["agreement"] - o["agreement"] for o, c in pairs]
        n = len(d)
        mean = sum(d) / n
        se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n) if n > 1 else float("nan")
        # (base found, run found) for every fact asked
        facts = [(a["slim"], b["slim"]) for o, c in pairs for a, b in zip(o["facts"], c["facts"])]
        lost = sum(a and not b for a, b in facts)
        gained = sum(b and not a for a, b in facts)
        agree = lambda side: sum(p[side]["agreement"] for p in pairs) / n
        found_n = lambda side: sum(f[side] for f in facts)
        print(f"{length:6} {n:5} {agree(0):6.3f} {agree(1):6.3f} {mean:+8.4f} ± {se:.4f} "
              f"{sum(abs(v) > 1e-9 for v in d):7} {found_n(0):3}/{found_n(1):<3} {lost:4} {gained:6}")
    missing = len(run["cases"]) - sum(len(p) for p in by_length.values())
    if missing:
        print(f"  ({missing} cases of the run are not in the base)")


args = sys.argv[1:]
base = None
if args[:1] == ["--against"]:
    if len(args) < 3:
        sys.exit("usage: facts-report.py --against BASE.json RUN.json [OTHER.json ...]")
    with open(args[1]) as fh:
        base = json.load(fh)
    args = args[2:]
for path in args:
    with open(path) as fh:
        run = json.load(fh)
    print(f"== {path}: keep {run['slim']['keep_ratio']}")
    if base is not None:
        against(base, run)
        continue
    cells(run)
    losses(run)
    ranks(run)
    score_quality(run)
    parting(run)
