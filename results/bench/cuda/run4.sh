#!/usr/bin/env bash
# Device call of 2026-11-26 (H100): the im2col convolution (default on CUDA since this commit)
# against Burn's conv2d (DMD_CONV=native) on the same card, PyTorch eager on the same card, the
# full ImageNet-64 ADM at DMD2's batch 40 (memory check), and issue 9's single-GPU run of the
# training loops (`dmd train-teacher` and `dmd distill --devices 1` on CUDA). Same .carry/ as run.sh,
# plus .carry/fmnist/ (Fashion-MNIST's t10k-*-idx*-ubyte.gz).
set -u
OUTDIR="${DEST:-results/bench/cuda/out4}"; BUDGET=${BUDGET:-530}
. results/bench/cuda/common.sh
B="/tmp/dmd bench --device cuda"
PY="python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda"
# adm_tiny, batch 32: im2col (the CUDA default) with the reference check, PyTorch, Burn's conv2d.
run 90 dmd_tiny_im2col $B --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1,35,511 --json "$OUTDIR/dmd_tiny_im2col.json"
run 40 torch_tiny_f32 $PY --iters 10 --net-config $NET/adm_tiny.json --batch 32 --json "$OUTDIR/torch_tiny_f32.json"
run 60 dmd_tiny_native env DMD_CONV=native $B --net-config $NET/adm_tiny.json --batch 32 --iters 5 --train-iters 5 --sampling 1 --json "$OUTDIR/dmd_tiny_native.json"
# Issue 9: the training loops on one GPU: teacher (40 steps), pairs, DMD2 distillation (20 steps).
training_pipeline 60 40 90
# Full ImageNet-64 ADM: forward at batch 8 both ways (float32), then the DMD iteration at DMD2's
# batch 40 with bf16 bodies, and PyTorch's.
run 50 dmd_in64_b8_im2col $B --net-config $NET/adm_imagenet64.json --batch 8 --no-train --sampling 1 --warmup 1 --iters 3 --json "$OUTDIR/dmd_in64_b8_im2col.json"
run 120 dmd_in64_b40_bf16 $B --net-config $NET/adm_imagenet64.json --batch 40 --warmup 1 --iters 3 --train-iters 3 --sampling 1 --bf16 --json "$OUTDIR/dmd_in64_b40_bf16.json"
run 50 torch_in64_b40_bf16 $PY --iters 3 --net-config $NET/adm_imagenet64.json --batch 40 --bf16 --json "$OUTDIR/torch_in64_b40_bf16.json"
run 40 dmd_in64_b8_native env DMD_CONV=native $B --net-config $NET/adm_imagenet64.json --batch 8 --no-train --sampling 1 --warmup 1 --iters 2 --json "$OUTDIR/dmd_in64_b8_native.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
