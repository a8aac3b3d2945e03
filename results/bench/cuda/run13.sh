#!/usr/bin/env bash
# Third device call of 2026-11-28 (H100): is the CUDA distillation's DM loss (11-16% under the
# CPU's from the same teacher in run12, the other losses within ~1%) bf16 rounding or an error?
# From run12's CUDA teacher (carried as .carry/teacher12/): the same 20-step distillation with
# float32 bodies, and again with bf16 bodies (run-to-run spread on CUDA). The CPU runs of the
# same configs are in h100/run13/cpu/.
set -u
OUTDIR="${DEST:-results/bench/cuda/out13}"; BUDGET=${BUDGET:-150}
. results/bench/cuda/common.sh
abs=$(cd "$OUTDIR" && pwd)
fill="s#@DATA@#$PWD/.carry/fmnist#; s#@TEACHER@#$PWD/.carry/teacher12/teacher.safetensors#; s#@PAIRS@#/tmp/pairs#"
sed "$fill; s#@OUT@#$abs/distill_f32#; s#bf16_body = true#bf16_body = false#" results/bench/cuda/distill_fmnist_cuda.toml > /tmp/distill_f32.toml
sed "$fill; s#@OUT@#$abs/distill_bf16#" results/bench/cuda/distill_fmnist_cuda.toml > /tmp/distill_bf16.toml
run 20 cuda_make_pairs /tmp/dmd make-pairs --device cuda --teacher .carry/teacher12/teacher.safetensors --num 64 --steps 4 --out /tmp/pairs
run 50 cuda_distill_f32 /tmp/dmd distill --config /tmp/distill_f32.toml --devices 1
run 40 cuda_distill_bf16 /tmp/dmd distill --config /tmp/distill_bf16.toml --devices 1
cp /tmp/distill_f32.toml /tmp/distill_bf16.toml "$OUTDIR/"
rm -rf "$OUTDIR"/distill_*/checkpoint* "$OUTDIR"/distill_*/*.safetensors
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
