#!/usr/bin/env bash
# Second device call of 2026-11-28 (afternoon session), after run14 (h200/run14/): there the
# teacher step's loss forward took 70.6 ms against 18.9 ms for the same network's forward
# without autodiff, its Adam update 73.6 to 145.8 ms from run to run with the same code, and
# cubek's async and TMA algorithms were declined on the H200 ("Async barrier instructions are
# not available"). This call asks whether the host (launches, autodiff bookkeeping) or the
# device's memory management keeps the GPU waiting:
#  - `dmd bench` now also reports each part's host time (until its calls return);
#  - CubeCL's memory settings from a cubecl.toml in the working directory (written here only):
#    CUDA's stream-ordered allocator (`[memory.cuda] allocator = "async"`, default "sync":
#    synchronous cuMemAlloc/cuMemFree) and persistent pools for weight-sized allocations
#    (`[memory] persistent_memory = "size-match"`), the baseline with CubeCL's memory log;
#  - the best of those with run14's two better choices (DMD_CONV_WGRAD=im2col,
#    DMD_ADAM_GRAD=copy); correctness of that setting (adm_tiny); PyTorch on the same machine.
# .carry/ as for run14.
set -u
OUTDIR="${DEST:-results/bench/cuda/out15}"; BUDGET=${BUDGET:-330}
. results/bench/cuda/common.sh
TINY="/tmp/dmd bench --device cuda --check-reference $REF --net-config $NET/adm_tiny.json --batch 32 --iters 5 --train-iters 5 --sampling 1 --ops --bf16"
B8="/tmp/dmd bench --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --sampling 1 --warmup 1 --iters 3 --train-iters 3"
# cubecl.toml for one run: NAME TOML
with_toml() { printf '%b' "$2" > cubecl.toml; cp cubecl.toml "$OUTDIR/cubecl_$1.toml"; }
LOG_MEM='[memory.logger]\nlevel = "basic"\nfile = "/tmp/cubecl_memory.log"\n'
ASYNC='[memory.cuda]\nallocator = "async"\n'
SIZE_MATCH='[memory]\npersistent_memory = "size-match"\n'
with_toml baseline "$LOG_MEM"
run 45 dmd_in64_b8_baseline $B8 --json "$OUTDIR/dmd_in64_b8_baseline.json"
[ -f /tmp/cubecl_memory.log ] && { wc -l /tmp/cubecl_memory.log; grep -c "Carving pages" /tmp/cubecl_memory.log; head -c 20000 /tmp/cubecl_memory.log; } > "$OUTDIR/cubecl_memory_log_head.txt" 2>&1
with_toml async "$ASYNC"
run 40 dmd_in64_b8_async_alloc $B8 --json "$OUTDIR/dmd_in64_b8_async_alloc.json"
with_toml size_match "$SIZE_MATCH"
run 40 dmd_in64_b8_size_match $B8 --json "$OUTDIR/dmd_in64_b8_size_match.json"
with_toml both "$ASYNC$SIZE_MATCH"
run 40 dmd_in64_b8_both $B8 --json "$OUTDIR/dmd_in64_b8_both.json"
BEST=$(python3 - "$OUTDIR" <<'EOF'
import json, os, sys
times = {}
for name in ("baseline", "async_alloc", "size_match", "both"):
    try:
        times[name] = json.load(open(os.path.join(sys.argv[1], f"dmd_in64_b8_{name}.json")))["dmd_step_ms"]
    except Exception:
        pass
print(min(times, key=times.get) if times else "baseline")
EOF
)
case $BEST in async_alloc) with_toml best "$ASYNC";; size_match) with_toml best "$SIZE_MATCH";; both) with_toml best "$ASYNC$SIZE_MATCH";; *) rm -f cubecl.toml;; esac
echo "fastest memory setting: $BEST" | tee "$OUTDIR/fastest.txt"
run 40 dmd_in64_b8_best_im2col_copy env DMD_CONV_WGRAD=im2col DMD_ADAM_GRAD=copy $B8 --json "$OUTDIR/dmd_in64_b8_best_im2col_copy.json"
run 40 dmd_in64_b8_best_copy env DMD_ADAM_GRAD=copy $B8 --json "$OUTDIR/dmd_in64_b8_best_copy.json"
run 35 dmd_tiny_best_im2col_copy env DMD_CONV_WGRAD=im2col DMD_ADAM_GRAD=copy $TINY --json "$OUTDIR/dmd_tiny_best_im2col_copy.json"
rm -f cubecl.toml
run 50 torch_in64_b8 python3 tools/bench_edm_pytorch.py --edm .carry/edm --device cuda --net-config $NET/adm_imagenet64.json --batch 8 --iters 3 --json "$OUTDIR/torch_in64_b8.json"
kill $SMI
[ -n "${OUT:-}" ] && tar -czf "$OUT/bench.tgz" -C "$OUTDIR" .
