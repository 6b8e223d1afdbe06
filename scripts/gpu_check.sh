#!/usr/bin/env bash
# One-command GPU check (issue 11): run on a machine with a CUDA GPU, from the repo root.
#
#   bash scripts/gpu_check.sh [OUTDIR]
#
# 1. nvidia-smi and torch's view of the device;
# 2. the CUDA ring tests (exact matmul / conv2d mod 2^64 on CUDA equal to the CPU result);
# 3. the exact ring matmul / conv2d benchmark against one float64 op of the same shape;
# 4. the linear-layer compute of LeNet and the small ResNet at batch 64 (every Conv2d /
#    Linear as ring product vs float64), on CUDA and, for comparison, on CPU.
#
# Every figure is a JSON line under OUTDIR (default: $OUT if set, else ./gpu_check_out).
# Needs the CUDA build of torch==2.13.0 in .venv (make venv installs the CPU build; on a
# GPU machine: .venv/bin/pip install torch==2.13.0 --index-url <cuda wheel index>).
# On a machine without CUDA it says so and exits 0 without running anything.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUTDIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUTDIR"
test -x "$PY" || { echo "gpu_check: $PY missing; run 'make venv' first" >&2; exit 2; }

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); skipping"
    exit 0
fi

fail=0
step() {  # step NAME CMD...: run, keep its output, remember failures, go on
    local name=$1; shift
    echo "== $name: $*"
    if "$@" > "$OUTDIR/$name.out" 2>&1; then echo "   ok"; else echo "   FAILED (rc $?)"; fail=1; fi
    tail -n 40 "$OUTDIR/$name.out"
}

step device bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"
step ring_tests "$PY" -m pytest -q -rs tests/unit/test_ring.py
step bench_ring_cuda "$PY" scripts/bench_ring.py --device cuda --seconds 2
step layers64_cuda "$PY" scripts/bench_ring.py --device cuda --models lenet,resnet --batch 64 --seconds 2
step layers64_cpu "$PY" scripts/bench_ring.py --device cpu --models lenet,resnet --batch 64 --seconds 2

grep -h '^{' "$OUTDIR"/bench_ring_cuda.out "$OUTDIR"/layers64_*.out > "$OUTDIR/figures.jsonl" 2>/dev/null
echo "gpu_check: figures in $OUTDIR/figures.jsonl; $([ $fail = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
exit $fail
