#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU: build fastface with its CUDA kernels, run the
# GPU tests and the fused-op backend tests, then time the fused kernels (bench/gpu_bench.py,
# which writes bench/results/gpu_check_<gpu>.json and .md).
#
#   bash bench/gpu_check.sh                 # everything (a few minutes)
#   bash bench/gpu_check.sh --no-compile    # arguments go to bench/gpu_bench.py
#
# PY picks the interpreter: default .venv/bin/python if there is one, else python3 if its torch
# is a CUDA build (a GPU image's own PyTorch, no network needed), else `make setup` makes .venv.
# Stages: build, kernel registration, GPU tests (pytest-xdist spreads Triton's compiles over the
# cores when installed), timings, and a short torchrun training run on the GPU (NCCL, bf16
# autocast, the on-device scheduler, a checkpoint and an evaluation) on synthetic faces.
# Every stage runs even when an earlier one fails, except that nothing runs after a failed
# build; the exit status is 0 only if all passed (2: no GPU or no CUDA torch, nothing was run).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PY:-}" ]; then
  PY=.venv/bin/python
  if [ ! -x "$PY" ] && python3 -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    PY=$(command -v python3)
  fi
fi
failed=()

# STAGE_TIMEOUT=SECONDS caps each stage (a stage past it counts as failed), for a GPU lent by the minute.
stage() {  # stage NAME COMMAND...: run, report, remember a failure
  local name=$1 t0=$SECONDS
  shift
  echo "==> $name: $*"
  if ${STAGE_TIMEOUT:+timeout "$STAGE_TIMEOUT"} "$@"; then
    echo "==> $name: ok ($((SECONDS - t0)) s)"
  else
    echo "==> $name: FAILED (exit $?, $((SECONDS - t0)) s)"
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
# GPU_CHECK_BUILD=0 keeps the extension already built (a rerun, or one built on another machine
# for the same torch and Python) and only checks it below.
jobs=$(nproc 2>/dev/null || echo 4)
[ "${GPU_CHECK_BUILD:-1}" = 0 ] || stage build env FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$jobs}" \
  "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: the build failed; nothing else was run" >&2
  exit 1
fi
stage info "$PY" -m fastface.info
stage cuda-kernels-registered "$PY" -c "
import torch, fastface.ops
for op in ('ir_block', 'dwconv_bn_act', 'dwconv_bn_act_backward', 'dwconv2d', 'fastface_sched_step'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('fastface::' + op, 'CUDA'), op + ': no CUDA kernel'
print('CUDA kernels registered')
"

xdist=()
if "$PY" -c "import xdist" 2>/dev/null; then
  xdist=(-n "$(( jobs < 8 ? jobs : 8 ))")
fi
stage gpu-tests "$PY" -m pytest -q "${xdist[@]}" -m gpu tests
# The CUDA sources' CPU emulation, Triton's ahead-of-time compile for sm_90, the build checks (the
# GPU tests of the file ran above). Left out: the Triton-interpreter tests, the CPU CI's stand-in for
# a GPU (Triton 3.6's interpreter, in late-2026 CUDA images, stops on these kernels' loop bounds with
# a TypeError; 3.9's runs them).
stage fused-backend-tests "$PY" -m pytest -q "${xdist[@]}" -m "not gpu" -k "not interpreter and not through_dispatch" \
  tests/test_ops_fused_gpu_backends.py tests/test_build.py

stage bench "$PY" bench/gpu_bench.py "$@"

# The trainer end to end on the GPU: torchrun (NCCL), the on-device FastFace scheduler, a checkpoint
# and a verification evaluation; in float32 with fastface's CUDA kernels forced (depthwise conv + BN
# + ReLU6 in one op in training, the fused block in the evaluation: the model's default on CUDA is
# cuDNN, measured faster) and under bf16 autocast (cuDNN's convolutions in bf16).
run=build/gpu-check-train
stage train-data "$PY" -m fastface data synth --preset tiny --ids 200 --samples-per-id 20 --val-pairs 200 \
  --workers "$jobs" --out "$run/data" --quiet
for amp in none bf16; do
  backend=$([ "$amp" = none ] && echo cuda || echo "")
  stage "train-$amp" env FASTFACE_BACKEND="$backend" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m fastface train \
    --config configs/demo.yaml synth.enabled=false run.device=cuda run.amp=$amp run.max_steps=100 \
    run.eval_every=0 run.ckpt_every=50 run.log_every=20 data.num_workers=6 data.path="$run/data/train.rec" \
    "eval.sets=[$run/data/val.bin]" run.output="$run/out-$amp"
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED stages: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all stages passed; results in bench/results/gpu_check_*.md"
