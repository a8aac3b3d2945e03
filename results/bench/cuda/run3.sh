#!/usr/bin/env bash
# Third device call: `dmd` built with `--features cuda-autotune` (Burn's `autotune`), so
# that convolutions pick implicit-GEMM kernels instead of the direct kernel that dominated run.sh
# and run2.sh (h200/cubecl_kernel_times.txt). PyTorch's numbers for the same configs are in h200/
# (same card kind, same day). Same .carry/ as run.sh. Logs in h200-autotune/.
set -u
DEST="${DEST:-results/bench/cuda/out3}"; mkdir -p "$DEST"
OUTDIR="$DEST"
NET=experiments/configs/networks
xz -dc .carry/dmd.xz > /tmp/dmd && chmod +x /tmp/dmd
NVRTC=$(find /usr/local -name 'libnvrtc.so.13*' 2>/dev/null | head -n 1)
[ -n "$NVRTC" ] && export LD_LIBRARY_PATH="$(dirname "$NVRTC"):${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUTDIR/gpu.txt"
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 100 > "$OUTDIR/gpu_memory.csv" &
SMI=$!
run() {
    local limit=$1 name=$2; shift 2
    echo "$(date -u +%H:%M:%S.%N) start $name" >> "$OUTDIR/phases.txt"
    timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1; local rc=$?
    echo "$(date -u +%H:%M:%S.%N) end $name rc $rc" >> "$OUTDIR/phases.txt"
    echo "== $name (rc $rc)"; tail -n 7 "$OUTDIR/$name.log"
}
run 100 dmd_tiny_f32 /tmp/dmd bench --device cuda --check-reference .carry/reference/edm --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1,35,511 --json "$OUTDIR/dmd_tiny_f32.json"
run 190 dmd_in64_bf16 /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 40 --warmup 1 --iters 3 --train-iters 3 --sampling 1 --bf16 --json "$OUTDIR/dmd_in64_bf16.json"
run 40 dmd_tiny_bf16 /tmp/dmd bench --device cuda --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1,35 --bf16 --json "$OUTDIR/dmd_tiny_bf16.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
