"""Training configuration: dataclasses loaded from YAML (`fastface train --config X.yaml k=v ...`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fastface.config_io import ConfigError, load_config
from fastface.data.loader import DataConfig


@dataclass
class ModelConfig:
    """Which network: a registered preset with options, or an ArchSpec JSON file."""

    preset: str = "mobilenetv2_face"
    spec: str | None = None  # path to an ArchSpec JSON; overrides preset and the options below
    split: int = 1
    merge: Literal["add", "concat"] = "add"
    width: float = 1.0
    embedding: int = 512
    head: Literal["gdc", "pool"] = "gdc"
    init: str | None = None  # a model file / checkpoint to start from (weights transferred to this spec)


@dataclass
class SynthConfig:
    """Generate the synthetic RGB-D set at `root` first if it is not there (cached)."""

    enabled: bool = False
    preset: str = "demo"
    root: str = "data/synth-demo"
    seed: int = 0


@dataclass
class LossConfig:
    """Margin softmax over class centres (Partial FC when sample_rate < 1 or several ranks)."""

    margin: Literal["arcface", "cosface", "combined"] = "arcface"
    s: float = 64.0
    m1: float = 1.0
    m2: float | None = None
    m3: float | None = None
    sample_rate: float = 1.0


@dataclass
class OptimConfig:
    """Optimiser of backbone and class centres (`fc_weight_decay` overrides the centres' decay)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    fc_weight_decay: float | None = None
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 5.0  # max global grad norm; 0 disables


@dataclass
class SchedConfig:
    """LR schedule: the FastFace scheduler or a baseline."""

    name: Literal["fastface", "poly", "step", "cosine", "constant"] = "fastface"
    warmup_steps: int = 0
    # FastFace (see fastface.sched)
    alpha: float = 1e-3
    beta: float = 1e-3
    lambd: float = 5e-5
    tau: float = 0.05
    delta: float = 2.0
    max_halvings: int = 8
    # alpha, beta and lambd above are for a run of this many steps and are rescaled to the actual
    # run length (fastface.sched.rescale_to_run); None uses them as given (the paper's defaults
    # suit its 5-epoch MS1MV3 runs, ~25,000 steps: short runs want 25000 here)
    reference_steps: int | None = None
    # baselines
    power: float = 2.0  # poly
    milestones: tuple[float, ...] = (0.5, 0.75, 0.9)  # step: fractions of the run
    gamma: float = 0.1  # step
    min_lr: float = 0.0  # cosine


@dataclass
class RunConfig:
    """Loop, precision, logging, checkpoints, evaluation."""

    output: str = "runs/demo"
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; caps the epochs
    grad_accum: int = 1
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = True
    compile: bool = False
    # fastface's fused training path (fastface.models.fused_train); false: the model's plain modules.
    # Eager CPU: ATen's convs, each BN + residual add + ReLU6 one fastface.ops.bn_act call; under
    # torch.compile: depthwise conv + BN + ReLU6 in one op (dwconv_bn_act). None (auto): fused,
    # measured faster than the plain modules in each mode (bench/results/train_throughput.json:
    # fastface_fused / fastface_unfused). On a CUDA device the model keeps cuDNN's modules either way
    # unless FASTFACE_BACKEND=cuda|triton (bench/results/gpu_check_NVIDIA-H200.md: slower there).
    fused: bool | None = None
    # Keep large CPU blocks (>= 1 MiB) for reuse inside each training step (fastface.ops.cpu_cache,
    # the CPU twin of CUDA's caching allocator), so the step's activations and gradients are not
    # page-faulted in again every iteration. None (auto): on when training on the CPU with the
    # extension built (bench/results/train_throughput.json: fastface vs fastface_nocache).
    cpu_cache: bool | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    deterministic: bool = False
    threads: int | None = None  # torch intra-op threads per process
    log_every: int = 10
    eval_every: int = 0  # steps; 0: only at the end
    ckpt_every: int = 100  # steps; 0: only at the end
    keep_ckpts: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in output/ckpt
    max_nonfinite_run: int = 20  # this many non-finite losses in a row stop the run
    progress: bool = True  # a rich progress bar on rank 0
    tensorboard: bool = True
    plot: bool = True  # write a loss / LR / accuracy PNG at the end


@dataclass
class EvalConfig:
    """Verification sets (.bin) evaluated every run.eval_every steps and at the end."""

    sets: list[str] = field(default_factory=list)
    batch_size: int = 128
    nfolds: int = 10
    flip: bool = True


@dataclass
class TrainConfig:
    """Everything `fastface train` needs."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.run.grad_accum < 1:
            raise ConfigError(f"run.grad_accum: must be >= 1, got {self.run.grad_accum}")
        if self.run.epochs < 1 and not self.run.max_steps:
            raise ConfigError("run.epochs: must be >= 1 unless run.max_steps is set")
        if not 0 < self.loss.sample_rate <= 1:
            raise ConfigError(f"loss.sample_rate: must be in (0, 1], got {self.loss.sample_rate}")


def load_train_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from YAML plus dotted overrides (unknown keys raise ConfigError naming them)."""
    return load_config(TrainConfig, path, overrides)
