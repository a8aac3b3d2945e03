#!/usr/bin/env bash
# Third device call of 2026-11-27 (H100): `dmd` built with `--features cuda-fusion` (Burn's
# operation fusion), now with `gemm_conv2d` recorded as a fusion operation, against run7.sh /
# run8.sh (the same code without fusion, earlier machines of the same kind): the ImageNet-64 ADM
# at batch 8 (with the teacher step's split) and at batch 40 (bf16), adm_tiny with the reference
# check. .carry/ holds dmd.xz (the fusion build) and reference/edm.
set -u
OUTDIR="${DEST:-results/bench/cuda/out9}"; BUDGET=${BUDGET:-300}
. results/bench/cuda/common.sh
B="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --sampling 1 --warmup 1"
run 70 dmd_in64_b8_fusion $B --batch 8 --iters 3 --train-iters 3 --json "$OUTDIR/dmd_in64_b8_fusion.json"
run 50 dmd_tiny_fusion /tmp/dmd bench --device cuda --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1,35 --json "$OUTDIR/dmd_tiny_fusion.json"
run 100 dmd_in64_b40_bf16_fusion $B --batch 40 --iters 3 --train-iters 2 --bf16 --json "$OUTDIR/dmd_in64_b40_bf16_fusion.json"
run 40 dmd_fid_fusion /tmp/dmd bench --device cuda --fid --no-train --sampling 1 --fid-batch 32 --iters 3
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
