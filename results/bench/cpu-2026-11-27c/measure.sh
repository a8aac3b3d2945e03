#!/bin/bash
# Alternating rounds (ROUNDS, default 1-12): PyTorch eager, dmd at the session's start
# (5bb42cf), dmd now (cf7e5df); then --ops once each for PyTorch and dmd now (with the
# reference check and the 35-NFE sampler). summarize.py prints the table.
# EDM=path/to/NVlabs-edm DMD_BEFORE=path/to/dmd-built-at-5bb42cf results/bench/cpu-2026-11-27c/measure.sh
set -e
cd "$(dirname "$0")/../../.."
OUT=results/bench/cpu-2026-11-27c
NET=experiments/configs/networks/adm_tiny.json
for i in ${ROUNDS:-1 2 3 4 5 6 7 8 9 10 11 12}; do
  python3 tools/bench_edm_pytorch.py --edm "${EDM:?set EDM to an NVlabs/edm checkout}" --net-config $NET --batch 32 --threads 2 --iters 7 --json $OUT/pytorch-$i.json > $OUT/pytorch-$i.txt 2>&1
  "${DMD_BEFORE:?set DMD_BEFORE to dmd built at 5bb42cf}" bench --device cpu --batch 32 --iters 7 --train-iters 7 --sampling 1 --json $OUT/dmd-before-$i.json > $OUT/dmd-before-$i.txt 2>&1
  target/release/dmd bench --device cpu --batch 32 --iters 7 --train-iters 7 --sampling 1 --json $OUT/dmd-after-$i.json > $OUT/dmd-after-$i.txt 2>&1
done
[ "${OPS:-1}" = 0 ] && exit 0
python3 tools/bench_edm_pytorch.py --edm "$EDM" --net-config $NET --batch 32 --threads 2 --iters 10 --ops --json $OUT/pytorch-ops.json > $OUT/pytorch-ops.txt 2>&1
target/release/dmd bench --device cpu --batch 32 --iters 10 --train-iters 5 --sampling 1,35 --ops --check-reference ../shared/reference/edm --json $OUT/dmd-after-ops.json > $OUT/dmd-after-ops.txt 2>&1
echo done
