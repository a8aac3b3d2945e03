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
# The issue-9 training pipeline's configs with this machine's paths filled in.
fill() { sed "s#@DATA@#$PWD/.carry/fmnist#; s#@OUT@#$2#; s#@TEACHER@#$ABS/teacher/teacher.safetensors#; s#@PAIRS@#/tmp/pairs#" "$1"; }
