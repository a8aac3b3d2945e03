#!/usr/bin/env bash
# The device benchmark behind results/bench/cuda/: dmd-burn on CUDA and the official EDM network in
# PyTorch eager on the same card, same configs and batches. Run from the repository root on the GPU
# machine with, in .carry/ (not committed):
#   dmd.xz          `dmd` built here by scripts/prepare-cuda-build.sh, then
#                   CUDARC_CUDA_VERSION=13000 CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda --bin dmd
#                   (CUDA 13.0 matches the cards' 580 driver), compressed with xz
#   edm/            training/, torch_utils/, dnnlib/ of an NVlabs/edm checkout
#   reference/edm/  a copy of ../shared/reference/edm
# Writes every log and JSON to $DEST (default results/bench/cuda/out), and, when $OUT is set (the
# device tool's folder of returned files, at most 8 files), a tarball of them there.
set -u
DEST="${DEST:-results/bench/cuda/out}"; mkdir -p "$DEST"
OUTDIR="$DEST"
NET=experiments/configs/networks
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
xz -dc .carry/dmd.xz > /tmp/dmd && chmod +x /tmp/dmd
# Burn's CUDA backend compiles its kernels with NVRTC at run time: put CUDA 13's libnvrtc on the path.
NVRTC=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so.13*' 2>/dev/null | head -n 1)
[ -n "$NVRTC" ] && export LD_LIBRARY_PATH="$(dirname "$NVRTC"):${LD_LIBRARY_PATH:-}"
echo "nvrtc: ${NVRTC:-not found}" | tee -a "$OUTDIR/gpu.txt"
# GPU memory in use, sampled every 100 ms: the peak of each dmd run (Burn's memory pool included).
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 100 > "$OUTDIR/gpu_memory.csv" &
SMI=$!
run() { # seconds, name, then the command
    local limit=$1 name=$2; shift 2
    echo "$(date -u +%H:%M:%S.%N) start $name" >> "$OUTDIR/phases.txt"
    timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1; local rc=$?
    echo "$(date -u +%H:%M:%S.%N) end $name rc $rc" >> "$OUTDIR/phases.txt"
    echo "== $name (rc $rc)"; tail -n 8 "$OUTDIR/$name.log"
}
PY="python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --iters 10"
run 150 dmd_tiny_f32 /tmp/dmd bench --device cuda --check-reference .carry/reference/edm --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1,35,511 --json "$OUTDIR/dmd_tiny_f32.json"
run 60 torch_tiny_f32 $PY --net-config $NET/adm_tiny.json --batch 32 --json "$OUTDIR/torch_tiny_f32.json"
# Full ImageNet-64 ADM at DMD2's 40 images per GPU, bf16 body.
run 60 torch_in64_bf16 $PY --net-config $NET/adm_imagenet64.json --batch 40 --bf16 --iters 3 --json "$OUTDIR/torch_in64_bf16.json"
run 120 dmd_in64_bf16 /tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 40 --warmup 1 --iters 3 --train-iters 3 --sampling 1 --bf16 --json "$OUTDIR/dmd_in64_bf16.json"
run 60 dmd_tiny_bf16 /tmp/dmd bench --device cuda --net-config $NET/adm_tiny.json --batch 32 --iters 10 --train-iters 10 --sampling 1,35 --bf16 --json "$OUTDIR/dmd_tiny_bf16.json"
run 40 torch_tiny_bf16 $PY --net-config $NET/adm_tiny.json --batch 32 --bf16 --json "$OUTDIR/torch_tiny_bf16.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
