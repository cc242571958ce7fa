"""fastface.models.freeze: a folded snapshot equals the model's eval function, and stays a snapshot."""
from __future__ import annotations

import pytest
import torch

from fastface.arch import ArchSpec
from fastface.models import FrozenMobileNetV2, build_model, folded_eval, freeze
from fastface.ops import use_backend
from test_models import randomize, small_face

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, x):
    with torch.no_grad(), folded_eval(False):
        return model.eval()(x)


@pytest.mark.parametrize("split,merge,head", [(0, "add", "gdc"), (1, "add", "gdc"), (1, "concat", "gdc"), (2, "add", "pool"),
                                              (3, "concat", "gdc"), (4, "add", "gdc")])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_frozen_equals_eval(split, merge, head, channels_last):
    spec = small_face(split=split, merge=merge, head=head, width=0.5, input_size=32)
    model = randomize(build_model(spec).double(), split).eval()
    x = torch.randn(3, 4, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(split))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    net = freeze(model)
    ref = _reference(model, x)
    for _ in range(2):  # the first call resolves the backends, the second replays them
        torch.testing.assert_close(net(x), ref, atol=1e-11, rtol=1e-11)


def test_frozen_float32_face_model_and_forced_reference_backend():
    model = randomize(build_model(ArchSpec.face(split=1)), 3).eval()
    x = torch.randn(2, 4, 112, 112)
    net = freeze(model)
    ref = _reference(model, x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref, atol=2e-4, rtol=1e-4)
        with use_backend("reference"):  # another key: resolved again, to the reference ops
            torch.testing.assert_close(net(x), ref, atol=2e-4, rtol=1e-4)


def test_frozen_is_a_snapshot():
    model = randomize(build_model(small_face(split=2, width=0.5, input_size=32)).double(), 1).eval()
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    net = freeze(model)
    before = net(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(net(x), before, atol=0, rtol=0)
    torch.testing.assert_close(freeze(model)(x), _reference(model, x), atol=1e-8, rtol=1e-8)


def test_frozen_moves_with_to_and_runs_under_compile():
    model = randomize(build_model(small_face(split=1, width=0.5, input_size=32)), 2).eval()
    x = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    net = freeze(model).double()
    assert all(a.dtype == torch.float64 for _, args in net.steps for a in args if isinstance(a, torch.Tensor))
    ref = _reference(model.double(), x)
    # Folded in float32, then cast: float32 rounding of the folded weights.
    torch.testing.assert_close(net(x), ref, atol=1e-5, rtol=1e-4)
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(compiled(x), net(x), atol=1e-12, rtol=1e-12)


def test_freeze_rejects_what_it_cannot_fold():
    with pytest.raises(TypeError, match="MobileNetV2"):
        freeze(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="not foldable"):
        freeze(build_model(ArchSpec.mobilenetv2()))  # classifier head
    model = build_model(small_face(width=0.5, input_size=32))
    model.last.bn.running_mean = None
    with pytest.raises(ValueError, match="the last conv"):
        freeze(model)
    net = freeze(build_model(small_face(width=0.5, input_size=32)))
    assert isinstance(net, FrozenMobileNetV2)
    with pytest.raises(ValueError, match=r"expected input N x 4"):
        net(torch.randn(1, 3, 32, 32))


def test_frozen_net_evaluates_like_the_model():
    """Verification code that asks a model for its device works on a frozen net (no parameters)."""
    from fastface.eval.verification import embed

    model = randomize(build_model(small_face(split=1, width=0.5, input_size=32)), 4).eval()
    x = torch.randn(4, 4, 32, 32)
    net = freeze(model)
    assert net.device == torch.device("cpu")
    with torch.no_grad():
        torch.testing.assert_close(embed(net, x, batch_size=3), embed(model, x, batch_size=3), atol=1e-4, rtol=1e-4)
