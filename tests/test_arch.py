"""ArchSpec: JSON round-trip, validation errors that name the field, presets, edits."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastface.arch import ArchSpec, ArchSpecError, BlockSpec, HeadSpec, StemSpec

modalities = st.dictionaries(st.sampled_from(["rgb", "depth", "ir", "normal"]), st.integers(1, 4), min_size=1,
                             max_size=3)
blocks = st.lists(st.builds(BlockSpec, t=st.sampled_from([1, 2, 3.5, 6]), c=st.integers(1, 64),
                            s=st.sampled_from([1, 2]), k=st.sampled_from([1, 3, 5, 7])), min_size=0, max_size=6)


@st.composite
def specs(draw):
    inputs = draw(modalities)
    bl = draw(blocks)
    split = draw(st.integers(0, 1 + len(bl))) if len(inputs) > 1 else 0
    return ArchSpec(inputs=inputs, stem=StemSpec(draw(st.integers(1, 48)), draw(st.sampled_from([1, 3, 5])),
                                                 draw(st.sampled_from([1, 2]))),
                    blocks=tuple(bl), split=split, merge=draw(st.sampled_from(["add", "concat"])),
                    head=HeadSpec(draw(st.sampled_from(["gdc", "pool", "classifier"])), draw(st.integers(1, 600)),
                                  draw(st.sampled_from([0, 64, 1280])), draw(st.sampled_from([0.0, 0.2]))),
                    width=draw(st.sampled_from([0.35, 0.5, 1.0, 1.4])), input_size=draw(st.sampled_from([64, 112])),
                    name=draw(st.text(max_size=12)))


@settings(max_examples=150, deadline=None)
@given(specs())
def test_json_round_trip(spec):
    text = spec.to_json()
    back = ArchSpec.from_json(text)
    assert back == spec
    assert back.to_json() == text
    assert json.loads(text)["version"] == 1


def test_round_trip_file(tmp_path):
    spec = ArchSpec.face(split=3, merge="concat").with_replica(5)
    path = tmp_path / "spec.json"
    spec.save(str(path))
    assert ArchSpec.load(str(path)) == spec


BAD = [
    ({"inputs": {}}, "inputs"),
    ({"inputs": {"rgb": 0}}, "inputs['rgb']"),
    ({"inputs": {"rgb": 3, "depth": 1.5}}, "inputs['depth']"),
    ({"width": 0}, "width"),
    ({"width": "1"}, "width"),
    ({"input_size": 4}, "input_size"),
    ({"split": -1}, "split"),
    ({"split": 19}, "split"),
    ({"merge": "mul"}, "merge"),
    ({"stem": StemSpec(0, 3, 2)}, "stem.c"),
    ({"stem": StemSpec(32, 4, 2)}, "stem.k"),
    ({"stem": StemSpec(32, 3, 3)}, "stem.s"),
    ({"head": HeadSpec("softmax")}, "head.kind"),
    ({"head": HeadSpec("gdc", 0)}, "head.dim"),
    ({"head": HeadSpec("gdc", 512, -1)}, "head.last_c"),
    ({"head": HeadSpec("gdc", 512, 1280, 1.0)}, "head.dropout"),
]


@pytest.mark.parametrize("change,field", BAD)
def test_invalid_fields_are_named(change, field):
    with pytest.raises(ArchSpecError) as e:
        ArchSpec.face().replace(**change)
    assert f"ArchSpec.{field}" in str(e.value)


@pytest.mark.parametrize("index,change,field", [
    (3, {"t": 0}, "t"), (3, {"c": 0}, "c"), (3, {"s": 3}, "s"), (3, {"k": 2}, "k"), (3, {"e": 0}, "e"),
    (0, {"e": 7}, "e"),  # t = 1: no expand conv, so e must equal the input channels
])
def test_invalid_block_fields_are_named(index, change, field):
    spec = ArchSpec.face()
    bl = list(spec.blocks)
    bl[index] = BlockSpec(**{**bl[index].__dict__, **change})
    with pytest.raises(ArchSpecError) as e:
        spec.replace(blocks=tuple(bl))
    assert f"ArchSpec.blocks[{index}].{field}" in str(e.value)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["inputs", "stem", "blocks", "split", "merge", "head", "width", "input_size"]),
       st.one_of(st.none(), st.text(max_size=3), st.integers(-5, -1), st.just(float("nan")),
                 st.floats(max_value=-1e-3)))
def test_json_with_garbage_fields_fails_naming_the_field(key, value):
    d = ArchSpec.face().to_dict()
    d[key] = value
    with pytest.raises(ArchSpecError) as e:
        ArchSpec.from_dict(d)
    assert key in str(e.value)


def test_unknown_keys_and_versions():
    d = ArchSpec.face().to_dict()
    with pytest.raises(ArchSpecError, match="unknown key 'colour'"):
        ArchSpec.from_dict({**d, "colour": 1})
    d2 = json.loads(ArchSpec.face().to_json())
    d2["blocks"][2]["expansion"] = 6
    with pytest.raises(ArchSpecError, match=r"blocks\[2\].*unknown key 'expansion'"):
        ArchSpec.from_dict(d2)
    with pytest.raises(ArchSpecError, match="version"):
        ArchSpec.from_dict({**d, "version": 99})
    with pytest.raises(ArchSpecError, match="not valid JSON"):
        ArchSpec.from_json("{")


def test_split_needs_two_modalities():
    with pytest.raises(ArchSpecError, match="split"):
        ArchSpec.face(inputs={"rgb": 3}, split=1)


def test_presets():
    mb = ArchSpec.mobilenetv2()
    assert len(mb.blocks) == 17 and mb.in_channels == 3 and mb.head.kind == "classifier"
    face = ArchSpec.face()
    assert face.in_channels == 4 and face.input_size == 112 and face.head.dim == 512
    assert face.final_size == 4  # 112 / 32, rounded up by the padding
    assert [b.to_str() for b in face.blocks[:3]] == ["ir_k3_s1_e1_c16", "ir_k3_s2_e6_c24", "ir_k3_s1_e6_c24"]
    half = ArchSpec.face(width=0.5)
    assert [li.cout for li in half.layers()][:3] == [16, 8, 16]


def test_replica_moves_split_with_the_branch():
    spec = ArchSpec.face(split=3)  # layers 0,1,2 = stem, block0, block1 are split
    inside = spec.with_replica(0)  # block0 is layer 1 < 3: the copy is inside the branches
    assert inside.split == 4 and len(inside.blocks) == 18
    edge = spec.with_replica(1)  # block1 is layer 2, the last branch layer: its copy joins the branch
    assert edge.split == 4
    outside = spec.with_replica(5)
    assert outside.split == 3
    copy = outside.blocks[6]
    assert (copy.s, copy.c) == (1, spec.blocks[5].c)
    strided = spec.with_replica(1 + 0)  # block 1 has stride 2 and 16 -> 24 channels
    assert strided.blocks[2].s == 1 and strided.layers()[3].residual
    with pytest.raises(ArchSpecError, match="no block 17"):
        spec.with_replica(17)
