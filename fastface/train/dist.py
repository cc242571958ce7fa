"""Process-group set-up from torchrun's environment: NCCL on GPU, gloo on CPU."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, evaluates and finalises checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def env_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's variables, (0, 1, 0) without them."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Initialise the process group if launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    rank, world, local = env_ranks()
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local % torch.cuda.device_count())
        dev = torch.device("cuda", local % torch.cuda.device_count())
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kw = {"device_id": dev} if dev.type == "cuda" else {}
            timeout = datetime.timedelta(seconds=timeout_s)
            store = _attempt_store(world, timeout)
            if store is not None:
                kw.update(store=store, rank=rank, world_size=world)
            dist.init_process_group(backend, timeout=timeout, **kw)
    return DistInfo(rank, world, local, dev, backend)


def _attempt_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's shared agent store, namespaced by restart attempt (None: let env:// decide).

    torchrun keeps one TCPStore server alive across worker restarts, and env:// does not
    separate attempts, so restarted ranks can read a dead peer's gloo/NCCL address left by
    the previous attempt and hang in init_process_group until the timeout (seen here with
    torch 2.13, one rank restarting before the other). A per-attempt prefix keeps them
    apart. Multi-node jobs whose nodes can disagree on the restart count should set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (then each attempt gets a fresh store).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"fastface/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def barrier() -> None:
    """Wait for all ranks (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of t over ranks (a collective; no host sync on NCCL)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj, src: int = 0):
    """rank src's Python object on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
