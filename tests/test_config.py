"""Config loading: YAML + dotted overrides into dataclasses; unknown keys and bad values are named."""
from __future__ import annotations

import pytest

from fastface.config_io import ConfigError, apply_overrides, parse_override
from fastface.train.config import TrainConfig, load_train_config


def test_demo_config_loads_and_overrides(tmp_path):
    cfg = load_train_config("configs/demo.yaml", ["optim.lr=0.05", "run.amp=bf16", "data.batch_size=32",
                                                  "eval.sets=[a.bin, b.bin]", "sched.milestones=[0.3, 0.6]"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 0.05 and cfg.run.amp == "bf16" and cfg.data.batch_size == 32
    assert cfg.eval.sets == ["a.bin", "b.bin"] and cfg.sched.milestones == (0.3, 0.6)


@pytest.mark.parametrize("path", ["configs/demo.yaml", "configs/gpu1.yaml", "configs/gpu8.yaml"])
def test_shipped_configs_are_valid(path):
    load_train_config(path)


@pytest.mark.parametrize("override,needle", [
    ("optim.learning_rate=0.1", "unknown config key 'optim.learning_rate'"),
    ("trainer.epochs=3", "unknown config key 'trainer'"),
    ("run.amp=fp8", "run.amp: 'fp8' is not one of"),
    ("run.epochs=two", "run.epochs: expected an integer"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("run.channels_last=maybe", "run.channels_last: expected true/false"),
    ("run.grad_accum=0", "run.grad_accum: must be >= 1"),
    ("loss.sample_rate=1.5", "loss.sample_rate"),
    ("data.colour=1", "colour"),
    ("novalue", "expected key=value"),
])
def test_bad_configs_name_the_key(override, needle):
    with pytest.raises((ConfigError, ValueError)) as e:
        load_train_config("configs/demo.yaml", [override])
    assert needle in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_train_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(str(bad))


def test_override_parsing():
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert apply_overrides({"a": {"b": 1, "c": 2}}, ["a.b=3", "d.e=x"]) == {"a": {"b": 3, "c": 2}, "d": {"e": "x"}}
