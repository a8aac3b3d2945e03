#!/bin/bash
# `dmd bench` on CubeCL's CPU runtime with every kernel launch dropped (examples/dry_run.rs):
# the CUDA build's work besides its kernels, for ImageNet-64's ADM at batch 8, in three
# placements of long-lived tensors, alternating over ROUNDS (default 3):
#   default   weights, Adam moments and EMAs in CubeCL's persistent pool (since c902c2c);
#   pool_off  DMD_PERSISTENT_POOL=off, the placement before c902c2c (CubeCL's shared pages);
#   enforced  cubecl.toml `[memory] persistent_memory = "enforced"` (every allocation).
# Build first:
#   scripts/prepare-cuda-build.sh
#   CARGO_TARGET_DIR=target/cubecpu cargo build --release --features cube-cpu --example dry_run
set -eu
cd "$(dirname "$0")/../../../../.."
OUT=results/bench/cuda/host/dry_run
BIN=$PWD/target/cubecpu/release/examples/dry_run
NET=$PWD/experiments/configs/networks/adm_imagenet64.json
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for i in $(seq 1 "${ROUNDS:-3}"); do
  for v in default pool_off enforced; do
    rm -f "$WORK/cubecl.toml"
    env=()
    [ $v = pool_off ] && env=(DMD_PERSISTENT_POOL=off)
    [ $v = enforced ] && printf '[memory]\npersistent_memory = "enforced"\n' > "$WORK/cubecl.toml"
    # cubecl.toml is read from the working directory.
    (cd "$WORK" && env "${env[@]}" "$BIN" bench --device cube-cpu --config "$NET" --batch 8 --warmup 2 --iters 15 --train-iters 15 --sampling 1 --json "$WORK/$v-$i.json") 2>&1 | grep -v '^note: implicit-GEMM\|^$\|^)' > "$OUT/$v-$i.txt"
    mv "$WORK/$v-$i.json" "$OUT/"
  done
done
