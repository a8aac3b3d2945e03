# Sourced by run4.sh, run5.sh, run6.sh (device calls of 2026-11-26; factored out after the runs,
# same commands). Needs OUTDIR and BUDGET (seconds for the whole script). Unpacks the carried
# `dmd`, puts CUDA 13's libnvrtc on the path (Burn compiles its kernels at run time), records
# the card, samples GPU memory every 100 ms (stop it with `kill $SMI`), and defines
#   run SECONDS NAME COMMAND...   (log in $OUTDIR/NAME.log, never past the script's budget)
mkdir -p "$OUTDIR"
NET=experiments/configs/networks
REF=.carry/reference/edm
xz -dc .carry/dmd.xz > /tmp/dmd && chmod +x /tmp/dmd
NVRTC=$(find /usr/local /opt /usr/lib -name 'libnvrtc.so.13*' 2>/dev/null | head -n 1)
[ -n "$NVRTC" ] && export LD_LIBRARY_PATH="$(dirname "$NVRTC"):${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUTDIR/gpu.txt"
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 100 > "$OUTDIR/gpu_memory.csv" &
SMI=$!
START=$(date +%s)
run() {
    local limit=$1 name=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) - 8 ))
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -le 5 ] && { echo "== $name skipped (budget)"; return; }
    echo "$(date -u +%H:%M:%S.%N) start $name (limit $limit s)" >> "$OUTDIR/phases.txt"
    timeout "$limit" "$@" > "$OUTDIR/$name.log" 2>&1; local rc=$?
    echo "$(date -u +%H:%M:%S.%N) end $name rc $rc" >> "$OUTDIR/phases.txt"
    echo "== $name (rc $rc)"; tail -n 12 "$OUTDIR/$name.log"
}
# Issue 9's training loops on one GPU: teacher (40 steps), pairs, DMD2 distillation (20 steps),
# from teacher_fmnist_cuda.toml and distill_fmnist_cuda.toml with this machine's paths filled in.
#   training_pipeline TEACHER_SECONDS PAIRS_SECONDS DISTILL_SECONDS
training_pipeline() {
    local abs; abs=$(cd "$OUTDIR" && pwd)
    local fill="s#@DATA@#$PWD/.carry/fmnist#; s#@TEACHER@#$abs/teacher/teacher.safetensors#; s#@PAIRS@#/tmp/pairs#"
    sed "$fill; s#@OUT@#$abs/teacher#" results/bench/cuda/teacher_fmnist_cuda.toml > /tmp/teacher.toml
    sed "$fill; s#@OUT@#$abs/distill#" results/bench/cuda/distill_fmnist_cuda.toml > /tmp/distill.toml
    run "$1" cuda_train_teacher /tmp/dmd train-teacher --config /tmp/teacher.toml --devices 1
    run "$2" cuda_make_pairs /tmp/dmd make-pairs --device cuda --teacher "$abs/teacher/teacher.safetensors" --num 64 --steps 4 --out /tmp/pairs
    run "$3" cuda_distill /tmp/dmd distill --config /tmp/distill.toml --devices 1
    cp /tmp/teacher.toml /tmp/distill.toml "$OUTDIR/"
    rm -rf "$OUTDIR"/teacher/checkpoint* "$OUTDIR"/distill/checkpoint*   # large; metrics, samples and the final weights come back
}
