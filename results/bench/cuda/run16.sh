#!/usr/bin/env bash
# Prepared 2026-11-28 for the next device call (not yet run; revised by the evening session).
# run14/run15 (h200/) found the teacher step's loss forward at 70 ms although its calls return
# after 25 ms, and a forward without autodiff at 17-19 ms before `dmd bench`'s training steps
# and 50-66 ms after them. CubeCL reserves memory on its device thread, the thread that also
# launches the kernels, and in its default pools each reservation walks the slices of every
# page before one that fits. tools/cubecl_pool_probe (CubeCL's own memory manager on the host,
# the ImageNet-64 ADM's parameter sizes) measured 6.8 us per reservation of a training step
# with the weights held in those pages, 12.6-17.8 us with the moments and an EMA as well, and
# 2.0 us with all of those in CubeCL's persistent pool, where the weights, moments and
# averages now live (fused_update.rs; DMD_PERSISTENT_POOL=off restores the old placement); a
# forward's reservations 5.1 us against 0.17 us. Also new since run15, not yet run on a GPU:
# the Adam/AdamW and EMA kernels write over their inputs, with one-dimensional cubes (they had
# computed every value 8 times). This call:
#  0. (after step 1 and PyTorch) the training loops on CUDA (common.sh's training_pipeline: teacher 40 steps, pairs, a
#     20-step distillation), whose losses must stay those of the CPU run (results/bench/cuda/
#     README.md, H100 2026-11-28: teacher steps 10/20/30/40 374.318 / 279.187 / 261.253 / 232.522);
#  1. batch 8: the default, then DMD_PERSISTENT_POOL=off (the placement before), then every
#     allocation persistent (cubecl.toml `persistent_memory = "enforced"`: the probe's 0.1-0.3 us
#     per reservation, at a memory cost the GPU peak column shows);
#  2. DMD_BENCH_CLEANUP=1 (CubeCL's explicit cleanup before the generation timing, which also
#     empties its cache of up to 4096 kernels' metadata buffers, live allocations in the small
#     pool that every small reservation walks: the probe's 38-49 us per reservation with them
#     there): if the one-step time falls back to the forward's, that cache is the cause;
#     CubeCL's profile of one forward, teacher step and DMD iteration (whole kernel names: the
#     kernels' own time against the wall time);
#  3. DMD2's setting (batch 40, bf16 body): the default and "enforced" (its memory);
#  4. PyTorch on the same machine (run right after step 1, the ratio being what counts).
# .carry/ as for run11 (fmnist/ included; dmd built from this commit).
set -u
OUTDIR="${DEST:-results/bench/cuda/out16}"; BUDGET=${BUDGET:-480}
. results/bench/cuda/common.sh
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1 --iters 3 --train-iters 3"
B40="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 40 --bf16 --sampling 1 --warmup 1 --iters 2 --train-iters 2"
# cubecl.toml in the working directory for the runs between with_toml and `rm -f cubecl.toml`.
with_toml() { printf '%b' "$2" > cubecl.toml; cp cubecl.toml "$OUTDIR/cubecl_$1.toml"; }
ENFORCED='[memory]\npersistent_memory = "enforced"\n'
run 45 dmd_in64_b8_default $B8 --json "$OUTDIR/dmd_in64_b8_default.json"
run 45 dmd_in64_b8_pool_off env DMD_PERSISTENT_POOL=off $B8 --json "$OUTDIR/dmd_in64_b8_pool_off.json"
with_toml enforced "$ENFORCED"
run 45 dmd_in64_b8_enforced $B8 --json "$OUTDIR/dmd_in64_b8_enforced.json"
rm -f cubecl.toml
run 50 torch_in64_b8 python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --iters 3 --json "$OUTDIR/torch_in64_b8.json"
training_pipeline 40 20 60
run 45 dmd_in64_b8_cleanup env DMD_BENCH_CLEANUP=1 $B8 --json "$OUTDIR/dmd_in64_b8_cleanup.json"
run 45 dmd_in64_b8_profile env CUBECL_DEBUG_LOG=/tmp/profile.log CUBECL_DEBUG_OPTION=profile /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 0 --iters 1 --train-iters 1
[ -f /tmp/profile.log ] && python3 results/bench/cuda/profile_summary.py /tmp/profile.log 80 0 > "$OUTDIR/cubecl_kernel_times.txt"
run 80 dmd_in64_b40_bf16_default $B40 --json "$OUTDIR/dmd_in64_b40_bf16_default.json"
with_toml enforced "$ENFORCED"
run 80 dmd_in64_b40_bf16_enforced $B40 --json "$OUTDIR/dmd_in64_b40_bf16_enforced.json"
rm -f cubecl.toml
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
