#!/usr/bin/env python3
"""Sums a CubeCL profile log (CUBECL_DEBUG_LOG=FILE CUBECL_DEBUG_OPTION=profile) per kernel.

Each profiled launch is a line `| DURATION | KERNEL NAME`. Every kernel's first launch
(compilation included) is counted apart; launches without a time (`not measured`, or the
placeholder 3600s CubeCL writes for some) are counted only.

    python3 profile_summary.py LOG [TOP [WIDTH]]     (WIDTH: characters of each name, 110; 0: whole)
"""
import collections
import re
import sys

UNITS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}


def ms(text):
    m = re.fullmatch(r"([0-9.]+)(ns|µs|us|ms|s)", text.strip())
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def main():
    path, top = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    width = int(sys.argv[3]) if len(sys.argv) > 3 else 110
    total, count, first, untimed = collections.Counter(), collections.Counter(), {}, 0
    for line in open(path, encoding="utf-8", errors="replace"):
        if not line.startswith("| "):
            continue
        parts = line.rstrip("\n").split("|", 2)
        if len(parts) < 3:
            continue
        t, name = ms(parts[1]), parts[2].strip()
        if t is None or t >= 3.6e6:
            untimed += 1
        elif name not in first:
            first[name] = t
        else:
            total[name] += t
            count[name] += 1
    print(f"# kernel time excluding each kernel's first launch: {sum(total.values()):.1f} ms over {sum(count.values())} launches; "
          f"first launches (with compilation) {sum(first.values()):.1f} ms over {len(first)} kernels; {untimed} launches without a time")
    for name, t in total.most_common(top):
        print(f"{t:10.2f} ms {count[name]:7d}  {name[:width] if width else name}")


if __name__ == "__main__":
    main()
