"""The ``fastface`` command line: one ``add_<cmd>_parser(subparsers)`` + handler per subcommand.

A subcommand registers itself in ``COMMANDS``; its parser sets ``func`` (the handler, which
takes the parsed namespace and returns an exit status). Heavy imports happen inside the
handlers, so ``fastface --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _data_synth(args: argparse.Namespace) -> int:
    from fastface.data.synth import generate, preset

    overrides = {"n_ids": args.ids, "samples_per_id": args.samples_per_id, "val_ids": args.val_ids, "val_pairs": args.val_pairs,
                 "test_ids": args.test_ids, "test_pairs": args.test_pairs, "seed": args.seed, "difficulty": args.difficulty}
    cfg = preset(args.preset, **overrides)
    out = args.out or f"data/synth-{args.preset}"
    res = generate(cfg, out, workers=args.workers, folder=args.folder, force=args.force, progress=not args.quiet)
    if res.reused:
        print(f"{out}: already holds this set (same generator version, arguments and seed); reused. --force regenerates.")
    else:
        print(f"{out}: {res.images} images in {res.seconds:.1f} s ({res.rate:.0f} img/s, {res.rate * 60:.0f}/min, {args.workers} workers)")
    print(f"  train: {cfg.n_ids} identities x {cfg.samples_per_id} = {cfg.n_ids * cfg.samples_per_id} RGB-D images  ({out}/train.rec)")
    print(f"  val:   {cfg.val_pairs} pairs over {cfg.val_ids} other identities  ({out}/val.bin)")
    print(f"  test:  {cfg.test_pairs} pairs over {cfg.test_ids} other identities  ({out}/test.bin)")
    return 0


def _data_info(args: argparse.Namespace) -> int:
    from fastface.data.sources import open_source

    src = open_source(args.path)
    print(f"{src.path}: {len(src)} images, {src.num_classes} identities, depth: {'yes' if src.has_depth else 'no'}")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    """``fastface data synth|info``."""
    p = subparsers.add_parser("data", help="make or inspect data sets")
    sub = p.add_subparsers(dest="data_cmd", required=True)
    s = sub.add_parser("synth", help="generate synthetic RGB-D faces (RecordIO + verification .bin); reuses an identical set")
    s.add_argument("--preset", default="demo", choices=["demo", "small", "full", "tiny"], help="size preset (default: demo)")
    s.add_argument("--out", help="output directory (default: data/synth-<preset>)")
    s.add_argument("--seed", type=int, default=None, help="generator seed (default 0)")
    s.add_argument("--difficulty", type=float, default=None, help="scales pose, expression, lighting, noise, occlusion (default 1)")
    s.add_argument("--ids", type=int, default=None, help="training identities")
    s.add_argument("--samples-per-id", type=int, default=None, help="images per training identity")
    s.add_argument("--val-ids", type=int, default=None)
    s.add_argument("--val-pairs", type=int, default=None)
    s.add_argument("--test-ids", type=int, default=None)
    s.add_argument("--test-pairs", type=int, default=None)
    s.add_argument("--workers", type=int, default=2, help="rendering processes (output is identical for any number)")
    s.add_argument("--folder", action="store_true", help="also write train/<identity>/<n>.jpg + _depth.png")
    s.add_argument("--force", action="store_true", help="regenerate even if the set is already there")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_data_synth)
    i = sub.add_parser("info", help="summarise a .rec or image folder")
    i.add_argument("path")
    i.set_defaults(func=_data_info)


def _train(args: argparse.Namespace) -> int:
    from fastface.train.config import load_train_config
    from fastface.train.trainer import train

    cfg = load_train_config(args.config, args.overrides)
    if args.resume:
        cfg.run.resume = True
    metrics = train(cfg)
    for name, r in metrics["verification"].items():
        print(f"{name} verification accuracy: {r['accuracy']:.4f}")
    return 0


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    """``fastface train --config X.yaml [key=value ...]`` (also under torchrun)."""
    p = subparsers.add_parser("train", help="train a model (one process, or one rank under torchrun)",
                              description="Train from a YAML config; key=value arguments override it "
                                          "(e.g. optim.lr=0.05 run.epochs=3). Multi-GPU / multi-node: "
                                          "torchrun --nproc_per_node N -m fastface train --config ...")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_train)


def _eval(args: argparse.Namespace) -> int:
    import json

    from fastface.data.verification import load_pairs
    from fastface.eval.cost import spec_cost
    from fastface.eval.latency import measure
    from fastface.eval.verification import evaluate_model
    from fastface.train.checkpoint import load_model

    model = load_model(args.model)
    spec = model.spec
    channels = "rgbd" if len(spec.inputs) > 1 else next(iter(spec.inputs))
    out = {"params": spec_cost(spec)[0], "macs": spec_cost(spec)[1]}
    for path in args.sets:
        images, issame = load_pairs(path, channels, spec.input_size)
        r = evaluate_model(model, images, issame, batch_size=args.batch_size, nfolds=args.nfolds)
        out[path] = r.as_dict()
        print(f"{path}: {r}")
    lat = measure(model, (spec.in_channels, spec.input_size, spec.input_size), batch=1, runs=args.runs)
    out["latency_ms_batch1"] = lat.median_ms
    print(f"params {out['params']:,}  MACs {out['macs'] / 1e6:.1f}M  latency (batch 1, CPU) {lat.median_ms:.2f} ms")
    if args.json:
        from fastface.utils import atomic_write_text

        atomic_write_text(args.json, json.dumps(out, indent=2))
    return 0


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    """``fastface eval MODEL --sets a.bin b.bin``."""
    p = subparsers.add_parser("eval", help="verification accuracy, params, MACs and latency of a trained model")
    p.add_argument("model", help="model.pt written by training (or a checkpoint folder)")
    p.add_argument("--sets", nargs="*", default=[], help="verification .bin files")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--nfolds", type=int, default=10)
    p.add_argument("--runs", type=int, default=30, help="timed runs for the latency median")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=_eval)


def _export(args: argparse.Namespace) -> int:
    from fastface.eval.export import export_onnx
    from fastface.train.checkpoint import load_model

    model = load_model(args.model)
    err = export_onnx(model, args.out, opset=args.opset)
    print(f"{args.out}: ONNX opset {args.opset}, dynamic batch; onnxruntime vs PyTorch max |diff| {err:.2e}")
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    """``fastface export MODEL --out model.onnx``."""
    p = subparsers.add_parser("export", help="export a trained model to ONNX (checked with onnxruntime)")
    p.add_argument("model", help="model.pt written by training")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=_export)


def _demo(args: argparse.Namespace) -> int:
    from fastface.demo import main as demo_main

    return demo_main(args.overrides)


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    """``fastface demo``: the main job on the embedded synthetic data (what `make demo` runs)."""
    p = subparsers.add_parser("demo", help="the main job on the embedded synthetic RGB-D data")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of configs/demo.yaml")
    p.set_defaults(func=_demo)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_data_parser, add_train_parser, add_eval_parser, add_export_parser, add_demo_parser]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="fastface", description="Fast training and search of compact (RGB-D) face-recognition networks")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastface`` and ``python -m fastface``."""
    args = build_parser().parse_args(argv)
    from fastface.arch import ArchSpecError
    from fastface.config_io import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, ArchSpecError) as e:
        print(f"fastface {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
