#!/usr/bin/env bash
# Second device call (after run.sh): PyTorch with bf16 autocast (run.sh's bf16 runs hit EDM's
# float32 assertion, since fixed in tools/bench_edm_pytorch.py), PyTorch on the full ImageNet-64
# ADM at batch 40, and dmd-burn's forward pass on that network at a small batch, float32 and bf16,
# to see why run.sh's batch-40 run did not finish in 120 s. Same .carry/ as run.sh.
set -u
DEST="${DEST:-results/bench/cuda/out2}"; mkdir -p "$DEST"
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
    echo "== $name (rc $rc)"; tail -n 12 "$OUTDIR/$name.log"
}
PY="python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda"
run 40 torch_tiny_bf16 $PY --iters 10 --net-config $NET/adm_tiny.json --batch 32 --bf16 --json "$OUTDIR/torch_tiny_bf16.json"
run 70 torch_in64_bf16 $PY --iters 3 --net-config $NET/adm_imagenet64.json --batch 40 --bf16 --json "$OUTDIR/torch_in64_bf16.json"
run 70 torch_in64_f32 $PY --iters 3 --net-config $NET/adm_imagenet64.json --batch 40 --json "$OUTDIR/torch_in64_f32.json"
run 75 dmd_in64_b8_f32 /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --no-train --sampling 1 --warmup 1 --iters 2 --json "$OUTDIR/dmd_in64_b8_f32.json"
run 75 dmd_in64_b8_bf16 /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --no-train --sampling 1 --warmup 1 --iters 2 --bf16 --json "$OUTDIR/dmd_in64_b8_bf16.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
