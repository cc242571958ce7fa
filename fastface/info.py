"""`python -m fastface.info`: what was built and which backends are usable here."""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

_BUILD_INFO = os.path.join(os.path.dirname(__file__), "_build_info.json")


def build_info() -> dict[str, Any]:
    """The build configuration recorded by setup.py (empty if the package was never built)."""
    try:
        with open(_BUILD_INFO) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return {"extension": False, "reason": f"no build record ({e})"}


def runtime_backends() -> dict[str, dict[str, Any]]:
    """Each backend (cpp, cuda, triton, dali) with whether it is usable now and why not."""
    import torch

    from fastface import _ext

    out: dict[str, dict[str, Any]] = {}
    out["cpp"] = {"usable": _ext.HAS_EXT, "why_not": _ext.EXT_ERROR}
    cuda_built = _ext.HAS_EXT and "cuda" in build_info().get("backends", [])
    # torch.cuda.is_available() does not create a context; it only counts devices.
    gpu = torch.cuda.is_available()
    why = None if (cuda_built and gpu) else ("extension built without CUDA" if not cuda_built else "no CUDA device")
    out["cuda"] = {"usable": cuda_built and gpu, "why_not": why}
    if importlib.util.find_spec("triton") is None:
        out["triton"] = {"usable": False, "why_not": "triton is not installed (pip install fastface[triton])"}
    elif gpu:
        out["triton"] = {"usable": True, "why_not": None}
    elif os.environ.get("TRITON_INTERPRET") == "1":
        out["triton"] = {"usable": True, "why_not": None, "note": "TRITON_INTERPRET=1: CPU interpreter (slow)"}
    else:
        out["triton"] = {"usable": False, "why_not": "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"}
    from fastface.data import dali_status

    ok, why = dali_status()
    out["dali"] = {"usable": ok, "why_not": why}
    return out


def main() -> None:
    """Print the build record and the run-time backends."""
    import torch

    import fastface

    print(f"fastface {fastface.__version__}  torch {torch.__version__}")
    print("build:", json.dumps(build_info(), indent=2))
    for name, st in runtime_backends().items():
        mark = "yes" if st["usable"] else "no "
        extra = st.get("why_not") or st.get("note") or ""
        print(f"  {name:7s} {mark}  {extra}")


if __name__ == "__main__":
    main()
