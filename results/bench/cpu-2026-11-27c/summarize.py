#!/usr/bin/env python3
"""Medians, fastest rounds and per-round ratios of the alternating rounds in this folder
(pytorch-N.json, dmd-before-N.json, dmd-after-N.json): python3 summarize.py"""
import glob, json, os, re, statistics

here = os.path.dirname(os.path.abspath(__file__))
keys = ["denoise_fwd_ms", "teacher_step_ms", "dmd_step_ms"]
rounds = sorted(int(re.search(r"-(\d+)\.json$", p).group(1)) for p in glob.glob(os.path.join(here, "pytorch-[0-9]*.json")))
load = lambda name, i: json.load(open(os.path.join(here, f"{name}-{i}.json")))
runs = {name: [load(name, i) for i in rounds] for name in ["pytorch", "dmd-before", "dmd-after"]}
print(f"{len(rounds)} rounds")
print(f"{'ms':<28}" + "".join(f"{k:>18}" for k in keys))
for name, rs in runs.items():
    print(f"{name + ', median / fastest':<28}" + "".join(f"{statistics.median(r[k] for r in rs):>10.1f} / {min(r[k] for r in rs):<5.1f}" for k in keys))
for name in ["dmd-before", "dmd-after"]:
    ratios = {k: [p[k] / d[k] for p, d in zip(runs["pytorch"], runs[name])] for k in keys}
    print(f"{'PyTorch / ' + name + ', median ratio':<36}" + "".join(f"{statistics.median(ratios[k]):>10.2f}" for k in keys))
    print(f"{'  rounds with ratio >= 1':<36}" + "".join(f"{sum(x >= 1 for x in ratios[k]):>7} of {len(rounds)}" for k in keys))
    print(f"{'  range of the ratios':<36}" + "".join(f"{min(ratios[k]):>7.2f}-{max(ratios[k]):.2f}" for k in keys))
ratios = {k: [b[k] / a[k] for b, a in zip(runs["dmd-before"], runs["dmd-after"])] for k in keys}
print(f"{'dmd-before / dmd-after, median':<36}" + "".join(f"{statistics.median(ratios[k]):>10.2f}" for k in keys))
