#!/usr/bin/env bash
# Device call of 2026-11-28 (second session). After run12 the implicit-GEMM convolutions are
# ~555 of the ~1063 ms of kernel time of an ImageNet-64 forward + teacher step + DMD iteration
# (h100/run12/cubecl_kernel_times.txt), all on cubek's simplest algorithm (synchronous loads,
# CMMA tiles: Burn's ImplicitGemm), and the teacher step's loss forward + backward takes 225 ms
# against a 20 ms forward without autodiff. This call:
#  1. PyTorch in the same call, its teacher step split as ours (forward / backward / update)
#     and torch.profiler's kernel table of one teacher step and one DMD iteration;
#  2. the ImageNet-64 ADM at batch 8 with each choice of convolution kernels: cubek's
#     algorithms (DMD_CONV_FWD / _DGRAD / _WGRAD = sync | async | tma, -mma: MMA tiles; no TMA
#     kernel for the input gradient) and this project's weight gradient by columns with a cut
#     contraction (DMD_CONV_WGRAD=im2col), the teacher step split in three;
#  3. correctness of the fastest choice and of im2col: adm_tiny against the official outputs
#     and --ops --bf16 (each kernel's output and gradients) against the CPU;
#  4. CubeCL's profile (whole kernel names) with the fastest choice; the Adam update with
#     channels-last weight gradients copied first (DMD_ADAM_GRAD=copy) or read in place;
#  5. Nsight Systems' kernel and API summaries where the machine has nsys.
# .carry/ as for run11.
set -u
OUTDIR="${DEST:-results/bench/cuda/out14}"; BUDGET=${BUDGET:-540}
. results/bench/cuda/common.sh
TINY="/tmp/dmd bench --device cuda --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 5 --train-iters 5 --sampling 1 --ops --bf16"
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1 --iters 3 --train-iters 3"
{ command -v nsys ncu nvcc; ls -d /usr/local/cuda*/bin /opt/nvidia/nsight* 2>&1; } > "$OUTDIR/tools.txt" 2>&1
run 60 torch_in64_b8 python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --iters 3 --profile "$OUTDIR/torch_profile.txt" --json "$OUTDIR/torch_in64_b8.json"
# The environment of a choice: "FWD DGRAD WGRAD", '-' leaves that pass at the default.
conv_env() {
    local v out=() names=(DMD_CONV_FWD DMD_CONV_DGRAD DMD_CONV_WGRAD) i=0
    for v in $1 $2 $3; do [ "$v" != - ] && out+=("${names[$i]}=$v"); i=$((i + 1)); done
    echo "${out[@]}"
}
declare -A CHOICE
#      name          forward    input grad  weight grad  --ops
for c in "default      -          -           -            ops" \
         "im2col       -          -           im2col       ops" \
         "async        async      async       async        -" \
         "async_im2col async      async       im2col       -" \
         "tma          tma        async       tma          -" \
         "sync_mma     sync-mma   sync-mma    sync-mma     -" \
         "async_mma    async-mma  async-mma   async-mma    -"; do
    set -- $c
    CHOICE[$1]="$(conv_env $2 $3 $4)"
    ops=""; [ "$5" = ops ] && ops="--ops"
    run 60 "dmd_in64_b8_$1" env ${CHOICE[$1]} $B8 $ops --json "$OUTDIR/dmd_in64_b8_$1.json"
done
BEST=$(python3 - "$OUTDIR" <<'EOF'
import glob, json, os, sys
times = {}
for p in glob.glob(os.path.join(sys.argv[1], "dmd_in64_b8_*.json")):
    t = json.load(open(p)).get("dmd_step_ms")
    if t:
        times[os.path.basename(p)[len("dmd_in64_b8_"):-5]] = t
print(min(times, key=times.get) if times else "default")
EOF
)
echo "fastest choice: $BEST (${CHOICE[$BEST]:-})" | tee "$OUTDIR/fastest.txt"
run 40 "dmd_tiny_$BEST" env ${CHOICE[$BEST]:-} $TINY --json "$OUTDIR/dmd_tiny_$BEST.json"
[ "$BEST" != im2col ] && run 40 dmd_tiny_im2col env ${CHOICE[im2col]} $TINY --json "$OUTDIR/dmd_tiny_im2col.json"
run 45 dmd_in64_b8_profile env ${CHOICE[$BEST]:-} CUBECL_DEBUG_LOG=/tmp/profile.log CUBECL_DEBUG_OPTION=profile $B8 --warmup 0 --iters 1 --train-iters 1
[ -f /tmp/profile.log ] && python3 results/bench/cuda/profile_summary.py /tmp/profile.log 80 0 > "$OUTDIR/cubecl_kernel_times.txt"
run 40 dmd_in64_b8_adam_copy env ${CHOICE[$BEST]:-} DMD_ADAM_GRAD=copy $B8 --json "$OUTDIR/dmd_in64_b8_adam_copy.json"
run 40 dmd_in64_b8_adam_in_place env ${CHOICE[$BEST]:-} $B8 --json "$OUTDIR/dmd_in64_b8_adam_in_place.json"
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -n 1)
if [ -n "$NSYS" ]; then
    run 60 nsys_profile env ${CHOICE[$BEST]:-} "$NSYS" profile --trace=cuda --sample=none --cpuctxsw=none -o /tmp/dmd_nsys -f true $B8 --warmup 1 --iters 1 --train-iters 1
    run 30 nsys_stats "$NSYS" stats --report cuda_gpu_kern_sum,cuda_api_sum --format csv -o "$OUTDIR/nsys" /tmp/dmd_nsys.nsys-rep
fi
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
