"""Process-group set-up under torchrun restarts (gloo on CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent("""
    import os, signal, time
    import torch
    import torch.distributed as dist
    from fastface.train import dist as ffdist

    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    rank = int(os.environ["RANK"])
    if attempt == 1 and rank == 0:
        time.sleep(3)  # rank 1 reaches the store first: it must not see attempt 0's addresses
    ffdist.setup("cpu", timeout_s=60)
    for i in range(3):
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 2
        if attempt == 0 and rank == 1 and i == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    print(f"rank {rank} attempt {attempt} done", flush=True)
    ffdist.cleanup()
""")


@pytest.mark.slow
def test_restarted_workers_rendezvous_despite_stale_store_keys(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(script)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "rank 0 attempt 1 done" in out and "rank 1 attempt 1 done" in out, out
