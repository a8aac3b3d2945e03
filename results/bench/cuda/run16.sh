#!/usr/bin/env bash
# Prepared 2026-11-28 for the next device call (not yet run). run14/run15 (h200/) found that a
# forward pass of the ImageNet-64 ADM without autodiff takes 17-19 ms before `dmd bench`'s
# training steps and 50-66 ms after them ("generation of a batch: 1 NFE", the same network and
# batch; H100 run12 too: 20.2 vs 59.5 ms), and that the teacher step's loss forward takes 70 ms
# although its calls return after 25 ms. The suspect is CubeCL's memory pools, whose every
# allocation walks the pages it holds. Since run15 the Adam/AdamW and EMA kernels write over
# their inputs (no three new tensors per parameter) and their cubes are one-dimensional (they
# had run every value 8 times: CubeCL's CubeDim::new is 32 x 8 on CUDA); neither has run on a
# GPU yet. This call:
#  0. the training loops on CUDA (common.sh's training_pipeline: teacher 40 steps, pairs, a
#     20-step distillation), whose losses must stay those of the CPU run (results/bench/cuda/
#     README.md, H100 2026-11-28: teacher steps 10/20/30/40 374.318 / 279.187 / 261.253 / 232.522);
#  1. the default at batch 8, then the same with DMD_BENCH_CLEANUP=1 (CubeCL's explicit cleanup
#     before the generation timing): if the one-step time falls back to the forward's, the
#     pools' state is the cause;
#  2. CubeCL's profile of one forward, teacher step and DMD iteration (whole kernel names: the
#     kernels' own time against the wall time);
#  3. DMD2's setting (batch 40, bf16 body), default and DMD_CONV_WGRAD=im2col (its memory: at
#     batch 8 in float32 it took `dmd bench` from 17.8 to 25.2 GiB);
#  4. PyTorch on the same machine.
# .carry/ as for run11 (fmnist/ included; dmd built from this commit).
set -u
OUTDIR="${DEST:-results/bench/cuda/out16}"; BUDGET=${BUDGET:-480}
. results/bench/cuda/common.sh
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1 --iters 3 --train-iters 3"
B40="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 40 --bf16 --sampling 1 --warmup 1 --iters 2 --train-iters 2"
run 45 dmd_in64_b8_default $B8 --json "$OUTDIR/dmd_in64_b8_default.json"
training_pipeline 40 20 60
run 45 dmd_in64_b8_cleanup env DMD_BENCH_CLEANUP=1 $B8 --json "$OUTDIR/dmd_in64_b8_cleanup.json"
run 45 dmd_in64_b8_profile env CUBECL_DEBUG_LOG=/tmp/profile.log CUBECL_DEBUG_OPTION=profile /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 0 --iters 1 --train-iters 1
[ -f /tmp/profile.log ] && python3 results/bench/cuda/profile_summary.py /tmp/profile.log 80 0 > "$OUTDIR/cubecl_kernel_times.txt"
run 80 dmd_in64_b40_bf16_default $B40 --json "$OUTDIR/dmd_in64_b40_bf16_default.json"
run 80 dmd_in64_b40_bf16_im2col env DMD_CONV_WGRAD=im2col $B40 --json "$OUTDIR/dmd_in64_b40_bf16_im2col.json"
run 50 torch_in64_b8 python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --iters 3 --json "$OUTDIR/torch_in64_b8.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
