#!/usr/bin/env bash
# Second device call of 2026-11-26 (H100), after run4.sh: where the time of the ImageNet-64 ADM's
# training step goes with im2col convolutions. Per-op forward and forward+backward (`--ops`,
# dmd-burn and PyTorch), CubeCL's per-kernel profile of one teacher step and one DMD iteration
# at batch 8 (float32), and the same step timings at batch 8. Same .carry/ as run4.sh.
set -u
OUTDIR="${DEST:-results/bench/cuda/out5}"; BUDGET=${BUDGET:-300}
. results/bench/cuda/common.sh
B="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8"
PY="python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json --batch 8"
run 60 dmd_in64_b8_ops $B --no-train --sampling 1 --warmup 1 --iters 3 --ops --json "$OUTDIR/dmd_in64_b8_ops.json"
run 40 torch_in64_b8_ops $PY --only fwd --ops --iters 3 --json "$OUTDIR/torch_in64_b8_ops.json"
run 70 dmd_in64_b8_steps $B --sampling 1 --warmup 1 --iters 2 --train-iters 2 --json "$OUTDIR/dmd_in64_b8_steps.json"
run 40 torch_in64_b8_steps $PY --iters 3 --json "$OUTDIR/torch_in64_b8_steps.json"
run 80 dmd_in64_b8_profile env CUBECL_DEBUG_LOG="$OUTDIR/cubecl_profile.log" CUBECL_DEBUG_OPTION=profile $B --sampling 1 --warmup 0 --iters 1 --train-iters 1
ls -la "$OUTDIR"; xz -T8 "$OUTDIR/cubecl_profile.log" 2>/dev/null
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
