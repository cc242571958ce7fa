"""The caching CPU allocator (fastface.ops.cpu_cache): reuse, never a live block twice, limits,
ownership across enable/disable, the profiler, fork, out of memory, and the trainer's use of it."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastface._ext import HAS_EXT
from fastface.ops import (
    cpu_cache, cpu_cache_info, empty_cpu_cache, set_cpu_cache_enabled, set_cpu_cache_limit,
)

pytestmark = pytest.mark.skipif(not HAS_EXT, reason="fastface._C not built")

MiB = 1 << 20


def _big(nbytes: int, fill: int = 0) -> torch.Tensor:
    return torch.full((nbytes,), fill % 256, dtype=torch.uint8)


@pytest.fixture(autouse=True)
def _clean_cache():
    """Each test starts and ends with the cache off and empty (the allocator is process-wide)."""
    set_cpu_cache_enabled(False)
    empty_cpu_cache()
    yield
    set_cpu_cache_enabled(False)
    empty_cpu_cache()


def test_a_freed_block_serves_the_next_allocation_of_its_size():
    with cpu_cache():
        a = _big(3 * MiB)
        ptr = a.data_ptr()
        del a
        before = cpu_cache_info()
        assert before.cached_bytes == 3 * MiB and before.cached_blocks == 1
        b = _big(3 * MiB - 100)  # the same page-rounded size
        after = cpu_cache_info()
    assert b.data_ptr() == ptr and after.hits == before.hits + 1 and after.cached_bytes == 0
    assert after.enabled and cpu_cache_info().installed and not cpu_cache_info().enabled


def test_blocks_from_64_kib_are_cached_and_smaller_ones_are_not():
    """The threshold (min_bytes, 64 KiB): the face model's 0.1-1 MiB maps are cached too (at 1 MiB glibc handed
    some of them fresh pages every step)."""
    with cpu_cache():
        assert cpu_cache_info().min_bytes == 64 << 10
        a, b = _big(64 << 10), _big((64 << 10) - 1)
        del a, b
        info = cpu_cache_info()
    assert info.cached_blocks == 1 and info.cached_bytes == 64 << 10


def test_small_allocations_and_allocations_outside_the_scope_bypass_it():
    before = cpu_cache_info()
    with cpu_cache():
        small = torch.empty(1000)
        del small
    x = _big(4 * MiB)
    del x
    after = cpu_cache_info()
    assert (after.hits, after.misses, after.cached_bytes) == (before.hits, before.misses, before.cached_bytes)


def test_a_block_made_inside_and_freed_outside_goes_back_to_the_system():
    with cpu_cache():
        x = _big(2 * MiB)
    live = cpu_cache_info().live_bytes
    del x
    info = cpu_cache_info()
    assert info.live_bytes == live - 2 * MiB and info.cached_bytes == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([1, 2, 3, 5]), st.integers(0, 7)), min_size=1, max_size=40))
def test_live_tensors_never_share_memory_and_keep_their_values(ops):
    """Random allocate/free sequences: a live tensor's bytes are never handed out again."""
    live: list[tuple[torch.Tensor, int]] = []
    with cpu_cache():
        for i, (alloc, mib, pick) in enumerate(ops):
            if alloc or not live:
                live.append((_big(mib * MiB + 17 * i, fill=i), i))
            else:
                live.pop(pick % len(live))
            spans = sorted((t.data_ptr(), t.data_ptr() + t.numel()) for t, _ in live)
            assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:])), "two live tensors overlap"
        for t, fill in live:
            assert bool((t == fill % 256).all())


def test_the_limit_caps_idle_bytes_and_evicts_other_sizes_first():
    old = set_cpu_cache_limit(5 * MiB)
    try:
        with cpu_cache():
            a, b, c = _big(2 * MiB), _big(2 * MiB), _big(3 * MiB)
            del a, b  # 4 MiB idle
            assert cpu_cache_info().cached_bytes == 4 * MiB
            del c  # 3 MiB more would exceed 5: 2 MiB blocks are evicted first
            info = cpu_cache_info()
            assert info.cached_bytes <= 5 * MiB and info.cached_bytes >= 3 * MiB
            d = _big(3 * MiB)
            assert cpu_cache_info().hits >= 1
            del d
            big = _big(6 * MiB)
            del big  # larger than the limit: never kept
            assert cpu_cache_info().cached_bytes <= 5 * MiB
        assert set_cpu_cache_limit(MiB) == 5 * MiB and cpu_cache_info().cached_bytes <= MiB
    finally:
        set_cpu_cache_limit(old)
    with pytest.raises(RuntimeError, match="limit must be >= 0"):
        set_cpu_cache_limit(-1)


def test_empty_releases_every_idle_block():
    with cpu_cache():
        xs = [_big(2 * MiB) for _ in range(3)]
        del xs
        assert cpu_cache_info().cached_blocks == 3
    assert empty_cpu_cache() == 6 * MiB
    assert cpu_cache_info().cached_bytes == 0 and empty_cpu_cache() == 0


def test_scopes_nest_and_restore_the_previous_state():
    with cpu_cache():
        with cpu_cache(False):
            assert not cpu_cache_info().enabled
        assert cpu_cache_info().enabled
        with pytest.raises(ValueError):
            with cpu_cache():
                raise ValueError("boom")
        assert cpu_cache_info().enabled
    assert not cpu_cache_info().enabled


def _train(mode: str, steps: int = 3) -> dict[str, torch.Tensor]:
    """A few fused training steps of a small face model; mode says where the cache is on."""
    from fastface.arch import ArchSpec
    from fastface.models import build_model
    from fastface.models.mobilenetv2 import fused_train

    torch.manual_seed(0)
    model = build_model(ArchSpec.face(split=1, width=0.35, embedding=32)).train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 112, 112, generator=g).contiguous(memory_format=torch.channels_last)
    for _ in range(steps):
        with cpu_cache(mode in ("on", "forward")), fused_train(True):
            loss = model(x).square().mean()
        with cpu_cache(mode in ("on", "backward")):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_bit_identical_with_the_cache_on_off_or_switched_between_passes():
    """Blocks made under one state and freed under the other (oneDNN's raw allocations too) are
    returned to whichever allocator made them; the numbers never change."""
    ref = _train("off")
    for mode in ("on", "forward", "backward"):
        got = _train(mode)
        for k in ref:
            assert torch.equal(ref[k], got[k]), f"{mode}: {k}"
    assert cpu_cache_info().hits > 0


def test_bn_act_outputs_reuse_only_idle_blocks():
    """A fused op's large output may reuse a freed block, never a live one (a view keeps it live)."""
    shape = (8, 64, 32, 32)  # 2 MiB in float32
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    x2 = (x1 * 0.5 - 1).contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    op = torch.ops.fastface.bn_act
    with cpu_cache():
        y1 = op(x1, gamma, beta, None, 1e-5, True)[0]
        keep = y1.clone()
        y2 = op(x2, gamma, beta, None, 1e-5, False)[0]
        assert y2.data_ptr() != y1.data_ptr() and torch.equal(y1, keep)
        ptr1 = y1.data_ptr()
        del y1
        y3 = op(x1, gamma, beta, None, 1e-5, True)[0]
        assert torch.equal(y3, keep) and y3.is_contiguous(memory_format=torch.channels_last)
        assert y3.data_ptr() == ptr1  # the idle block of that size
        view = y2[:1]
        del y2
        y4 = op(x1, gamma, beta, None, 1e-5, True)[0]
        assert y4.data_ptr() != view.data_ptr()


def test_the_profiler_sees_cached_allocations():
    from torch.profiler import ProfilerActivity, profile

    with cpu_cache(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        x = torch.empty(4 * MiB, dtype=torch.uint8)
        del x
    assert max(e.cpu_memory_usage for e in prof.key_averages()) >= 4 * MiB


def _child_allocates(q) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: the parent's OpenMP pool did not survive the fork
    with cpu_cache():
        x = torch.ones(3 * MiB, dtype=torch.uint8)
        del x
        y = torch.ones(3 * MiB, dtype=torch.uint8)
        q.put(int(y.sum()))


def test_a_forked_child_can_use_the_cache():
    with cpu_cache():
        keep = _big(2 * MiB)
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        p = ctx.Process(target=_child_allocates, args=(q,))
        p.start()
        got = q.get(timeout=60)
        p.join(60)
    assert p.exitcode == 0 and got == 3 * MiB
    del keep


def test_out_of_memory_is_a_clear_error():
    with cpu_cache(), pytest.raises(torch.OutOfMemoryError, match="fastface CPU cache: out of memory"):
        torch.empty(1 << 56, dtype=torch.uint8)
