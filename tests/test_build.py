"""Build and packaging: the build record, importing without CUDA, running without the extension,
and every CUDA source compiling with the machine's nvcc."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_info_prints_build_and_backends():
    out = subprocess.run([sys.executable, "-m", "fastface.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("cpp", "cuda", "triton", "dali"):
        assert f"  {name}" in out.stdout
    assert '"backends"' in out.stdout


def test_build_record_lists_cpp_backend():
    from fastface.info import build_info

    info = build_info()
    assert info["extension"] is True and "cpp" in info["backends"]
    assert "torch" in info and "cxx" in info


def test_import_never_initialises_cuda():
    # Any CUDA initialisation during import (or building a model, or choosing a backend)
    # would call torch.cuda._lazy_init: make it fail loudly.
    r = _run("""
        import torch, torch.cuda
        def boom(*a, **k): raise RuntimeError("CUDA initialised")
        torch.cuda._lazy_init = boom
        import fastface, fastface.ops, fastface.models, fastface.info
        m = fastface.build_model(fastface.ArchSpec.face(input_size=32)).eval()
        m(torch.randn(1, 4, 32, 32))
        fastface.info.runtime_backends()
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_package_works_without_the_extension():
    r = _run("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastface._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch, fastface
        from fastface import ops, info
        from fastface.ops import dwconv2d
        x = torch.randn(1, 4, 9, 9); w = torch.randn(4, 1, 3, 3); b = torch.randn(4)
        assert dwconv2d.select(x, w, b, 1, 1, True) == "reference"
        m = fastface.build_model(fastface.ArchSpec.face(input_size=32)).eval()
        assert m(torch.randn(2, 4, 32, 32)).shape == (2, 512)
        st = info.runtime_backends()["cpp"]
        assert not st["usable"] and "blocked for the test" in st["why_not"], st
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))),
                         ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    """What `make cuda-check` does, per file: CUDA code that does not compile never lands."""
    r = subprocess.run(["nvcc", "-arch=sm_90", "-std=c++17", "-O3", "-c", source, "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def test_build_info_is_json():
    with open(os.path.join(ROOT, "fastface", "_build_info.json")) as f:
        assert isinstance(json.load(f), dict)
