#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU: build fastface with its CUDA kernels, run the
# GPU tests and the fused-op backend tests, then time the fused kernels (bench/gpu_bench.py,
# which writes bench/results/gpu_check_<gpu>.json and .md).
#
#   bash bench/gpu_check.sh                 # everything (a few minutes)
#   bash bench/gpu_check.sh --no-compile    # arguments go to bench/gpu_bench.py
#
# PY picks the interpreter (default .venv/bin/python, created by `make setup` if missing; it
# must have a CUDA build of torch). Every stage runs even when an earlier one fails; the exit
# status is 0 only if all passed (2: no GPU or no CUDA torch, nothing was run).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
failed=()

stage() {  # stage NAME COMMAND...: run, report, remember a failure
  local name=$1
  shift
  echo "==> $name: $*"
  if "$@"; then
    echo "==> $name: ok"
  else
    echo "==> $name: FAILED (exit $?)"
    failed+=("$name")
  fi
}

if ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi -L failed)" >&2
  exit 2
fi
nvidia-smi -L

if [ ! -x "$PY" ]; then
  echo "==> $PY not found: make setup (installs the CUDA build of torch where a GPU is present)"
  make setup || { echo "gpu_check: make setup failed" >&2; exit 2; }
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
  echo "gpu_check: $PY has no usable CUDA torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1));" \
       "install one (e.g. rm -rf .venv && make setup) or set PY" >&2
  exit 2
fi

# Build the extension with the CUDA sources (setup.py picks csrc/cuda/*.cu and *.cpp up), for the
# visible GPUs unless TORCH_CUDA_ARCH_LIST says otherwise.
jobs=$(nproc 2>/dev/null || echo 4)
stage build env FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$jobs}" \
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
stage info "$PY" -m fastface.info
stage cuda-kernels-registered "$PY" -c "
import torch, fastface.ops
for op in ('ir_block', 'dwconv_bn_act', 'dwconv_bn_act_backward', 'dwconv2d', 'fastface_sched_step'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('fastface::' + op, 'CUDA'), op + ': no CUDA kernel'
print('CUDA kernels registered')
"

stage gpu-tests "$PY" -m pytest -q -m gpu tests
stage fused-backend-tests "$PY" -m pytest -q tests/test_ops_fused_gpu_backends.py tests/test_build.py

stage bench "$PY" bench/gpu_bench.py "$@"

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED stages: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all stages passed; results in bench/results/gpu_check_*.md"
