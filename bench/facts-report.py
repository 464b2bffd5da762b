#!/usr/bin/env python3
"""Read `slimchat facts --json` output and print where facts were lost.

  python3 bench/facts-report.py RUN.json [OTHER.json ...]

For each run: the cells (part, length, depth band: dense and pruned accuracy, lost/gained,
agreement, TTFT ratio), every lost fact with the stage that dropped it and its blocks' ranks
per stage, and, over every fact dense found, how the fact's worst block ranked at each stage
(rank / candidates, by depth band): how close to the cut the kept facts were. Last, over every
fact asked (found by dense or not): the median and mean relative rank of its worst block at each
stage, and how many facts each stage dropped: the score's quality, less noisy than the answers.
Only the standard library is used.
"""
import json
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


for path in sys.argv[1:]:
    with open(path) as fh:
        run = json.load(fh)
    print(f"== {path}: keep {run['slim']['keep_ratio']}")
    cells(run)
    losses(run)
    ranks(run)
    score_quality(run)
