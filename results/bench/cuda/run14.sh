#!/usr/bin/env bash
# Prepared 2026-11-28 for the next device call (not yet run). After run12 the implicit-GEMM
# convolutions are ~555 of the ~1063 ms of kernel time of an ImageNet-64 forward + teacher
# step + DMD iteration (h100/run12/cubecl_kernel_times.txt), all on cubek's simplest
# algorithm (synchronous loads, CMMA tiles: Burn's ImplicitGemm). Burn reaches its other
# algorithms only through autotune; `gemm_conv`'s DMD_CONV_FWD / DMD_CONV_DGRAD /
# DMD_CONV_WGRAD (sync | async | tma, optionally -mma) pick them. For each choice, correctness
# first (adm_tiny against the official outputs and --ops --bf16 against the CPU), then the
# ImageNet-64 ADM at batch 8 (the --ops rows time each convolution shape alone), PyTorch in the
# same call. The input gradient has no TMA kernel in cubek, so it gets async there. Last,
# the Adam update with each channels-last weight gradient copied first (DMD_ADAM_GRAD=copy)
# instead of read in place: in run12 the Adam kernels ran ~10x under the card's bandwidth.
# .carry/ as for run11.
set -u
OUTDIR="${DEST:-results/bench/cuda/out14}"; BUDGET=${BUDGET:-480}
. results/bench/cuda/common.sh
TINY="/tmp/dmd bench --device cuda --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 5 --train-iters 5 --sampling 1 --ops --bf16"
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1 --iters 3 --train-iters 3 --ops"
run 45 torch_in64_b8 python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --iters 3 --json "$OUTDIR/torch_in64_b8.json"
#     name        forward   input grad  weight grad
for choice in "default   -         -          -" \
              "async     async     async      async" \
              "tma       tma       async      tma" \
              "sync_mma  sync-mma  sync-mma   sync-mma" \
              "async_mma async-mma async-mma  async-mma"; do
    set -- $choice
    name=$1; env=()
    [ "$2" != - ] && env=(DMD_CONV_FWD=$2 DMD_CONV_DGRAD=$3 DMD_CONV_WGRAD=$4)
    run 40 "dmd_tiny_$name" env "${env[@]}" $TINY --json "$OUTDIR/dmd_tiny_$name.json"
    run 60 "dmd_in64_b8_$name" env "${env[@]}" $B8 --json "$OUTDIR/dmd_in64_b8_$name.json"
done
run 45 dmd_in64_b8_adam_copy env DMD_ADAM_GRAD=copy ${B8% --ops} --json "$OUTDIR/dmd_in64_b8_adam_copy.json"
run 45 dmd_in64_b8_adam_in_place ${B8% --ops} --json "$OUTDIR/dmd_in64_b8_adam_in_place.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
