"""Build fastface._C: C++ CPU ops always, CUDA ops where a CUDA toolkit and a CUDA torch exist.

Environment: FORCE_CUDA=1 builds the CUDA sources regardless; FASTFACE_NO_EXT=1 skips the
extension (the package then runs on its PyTorch reference paths); FASTFACE_MARCH sets the
CPU target (default "native": the extension is built where it runs); TORCH_CUDA_ARCH_LIST and
MAX_JOBS are honoured by torch's BuildExtension.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version(cmd: list[str], first: bool = False) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.strip().splitlines() if line.strip()]
    if not lines:
        return None
    return lines[0] if first else lines[-1]


def _ext_modules_and_cmdclass():
    if os.environ.get("FASTFACE_NO_EXT") == "1":
        return [], {}, {"extension": False, "reason": "FASTFACE_NO_EXT=1"}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    with_cuda = force_cuda or (torch.version.cuda is not None and CUDA_HOME is not None)
    march = os.environ.get("FASTFACE_MARCH", "native")
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-march={march}", "-ffp-contract=fast"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    info = {
        "extension": True,
        "backends": ["cpp"],
        "march": march,
        "cxx": _version([os.environ.get("CXX", "c++"), "--version"], first=True),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        # No --use_fast_math: its flush-to-zero turned the scheduler kernel's denormal LRs into 0 on an
        # H200 (the op must match the Python scheduler bit for bit); the kernels keep FMA contraction.
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        ext = CUDAExtension(
            "fastface._C", sources, define_macros=[("WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
        info["backends"].append("cuda")
        info["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "auto (visible GPUs)")
        info["nvcc"] = _version([os.path.join(CUDA_HOME or "", "bin", "nvcc"), "--version"])
    else:
        ext = CppExtension("fastface._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        info["cuda_skipped_because"] = (
            "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found (CUDA_HOME)"
        )
    print("fastface build configuration:\n" + json.dumps(info, indent=2), file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}, info


def _write_build_info(info: dict) -> None:
    # Written where both the editable and the regular install find it; the temp + rename
    # keeps a half-written file from ever being read.
    path = os.path.join(ROOT, "fastface", "_build_info.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, path)


ext_modules, cmdclass, build_info = _ext_modules_and_cmdclass()
_write_build_info(build_info)

packages = find_packages(include=["fastface", "fastface.*"]) + ["fastface.kernels"]
setup(
    packages=packages,
    package_dir={"fastface.kernels": "kernels"},
    package_data={"fastface": ["_build_info.json", "configs/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
