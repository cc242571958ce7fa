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
                 "test_ids": args.test_ids, "test_pairs": args.test_pairs, "seed": args.seed, "difficulty": args.difficulty,
                 "depth_format": args.depth_format}
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


def _data_convert_depth(args: argparse.Namespace) -> int:
    from fastface.data.recordio import convert_depth

    n = convert_depth(args.src, args.dst, args.format)
    print(f"{args.dst}: {n} depth maps written as {args.format}")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    """``fastface data synth|info|convert-depth``."""
    p = subparsers.add_parser("data", help="make or inspect data sets")
    sub = p.add_subparsers(dest="data_cmd", required=True)
    s = sub.add_parser("synth", help="generate synthetic RGB-D faces (RecordIO + verification .bin); reuses an identical set")
    s.add_argument("--preset", default="demo", choices=["demo", "small", "full", "search", "tiny"], help="size preset (default: demo)")
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
    s.add_argument("--folder", action="store_true", help="also write train/<identity>/<n>.jpg + _depth.<pgm|png>")
    s.add_argument("--depth-format", choices=["pgm", "png"], default=None,
                   help="depth encoding: pgm (16-bit, default, decodes 8-20x faster) or png (smaller files)")
    s.add_argument("--force", action="store_true", help="regenerate even if the set is already there")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_data_synth)
    i = sub.add_parser("info", help="summarise a .rec or image folder")
    i.add_argument("path")
    i.set_defaults(func=_data_info)
    c = sub.add_parser("convert-depth", help="rewrite an RGB-D .rec with its depth maps as 16-bit PGM (fast decode) "
                                             "or PNG; keys, labels and RGB bytes unchanged")
    c.add_argument("src", help="source .rec (its .idx beside it)")
    c.add_argument("dst", help="destination .rec (the .idx is written beside it)")
    c.add_argument("--format", choices=["pgm", "png"], default="pgm")
    c.set_defaults(func=_data_convert_depth)


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


def _search_config(args: argparse.Namespace):
    from fastface.search.driver import load_search_config

    overrides = list(args.overrides)
    if getattr(args, "output", None):
        overrides.append(f"output={args.output}")
    for flag, key in (("parallel", "parallel.mode"), ("nproc", "parallel.nproc"), ("workers", "parallel.workers"),
                      ("threads", "parallel.threads"), ("mode", "netadapt.mode"), ("base", "netadapt.base")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "from_scratch", False):
        overrides.append("replicate_split.from_scratch=true")
    return load_search_config(args.config, overrides)


def _search_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Search failures that are the user's to fix: one line on stderr, exit status 2."""
    def run(args: argparse.Namespace) -> int:
        from fastface.search.driver import SearchBusyError
        from fastface.search.journal import JournalError
        from fastface.search.runner import CandidateError

        try:
            return fn(args)
        except (SearchBusyError, JournalError, CandidateError, FileNotFoundError) as e:
            print(f"fastface search: {e}", file=sys.stderr)
            return 2
    return run


@_search_errors
def _search_rs(args: argparse.Namespace) -> int:
    from fastface.search.driver import run_replicate_split

    run_replicate_split(_search_config(args))
    return 0


@_search_errors
def _search_netadapt(args: argparse.Namespace) -> int:
    from fastface.search.driver import run_netadapt

    cfg = _search_config(args)
    run_netadapt(cfg, cfg.netadapt.mode)
    return 0


@_search_errors
def _search_lut(args: argparse.Namespace) -> int:
    from fastface.arch import ArchSpec
    from fastface.search.driver import base_spec, build_lut_file, load_search_config, load_train

    if args.spec:
        spec = ArchSpec.load(args.spec)
    elif args.model:
        from fastface.train.checkpoint import load_model

        spec = load_model(args.model).spec
    else:
        spec = base_spec(load_train(load_search_config(args.config, args.overrides)))
    build_lut_file(spec, args.out, g=args.g, sweep=not args.no_sweep, check_networks=args.check, threads=args.threads,
                   batch=args.batch, runs=args.runs, rounds=args.rounds)
    return 0


@_search_errors
def _search_report(args: argparse.Namespace) -> int:
    from fastface.search.report import write_report

    write_report(args.folder, _console())
    return 0


def _console():
    from fastface.search.driver import _console as search_console

    return search_console(None)


def add_search_parser(subparsers: argparse._SubParsersAction) -> None:
    """``fastface search replicate-split|netadapt|lut|report``."""
    p = subparsers.add_parser("search", help="architecture search: replicate/split, NetAdaptV2, latency LUT, report",
                              description="Resumable architecture searches: run the same command again to continue "
                                          "a killed search. Configs: configs/search_demo.yaml; key=value overrides.")
    sub = p.add_subparsers(dest="search_cmd", required=True)
    rs = sub.add_parser("replicate-split", help="two-step search: replicate blocks (greedy), then move the input split")
    rs.add_argument("--config", help="search YAML (see configs/search_demo.yaml)")
    rs.add_argument("--output", help="output folder (search config key `output`)")
    rs.add_argument("--from-scratch", action="store_true", help="train every child from random initialisation "
                                                               "(no weight transfer), to measure what transfer saves")
    rs.add_argument("--parallel", choices=["ddp", "concurrent"], help="ddp: each candidate data-parallel on all "
                    "devices (torchrun), one after another; concurrent: several candidates at once")
    rs.add_argument("--nproc", type=int, help="processes per candidate (ddp: one per GPU; CPU: gloo)")
    rs.add_argument("--workers", type=int, help="concurrent: candidates trained at once")
    rs.add_argument("--threads", type=int, help="intra-op threads per training process")
    rs.add_argument("overrides", nargs="*", metavar="key=value")
    rs.set_defaults(func=_search_rs)
    na = sub.add_parser("netadapt", help="NetAdaptV2: CBC super-network, ordered dropout, MCD (or --mode scd: NetAdapt v1)")
    na.add_argument("--config", help="search YAML")
    na.add_argument("--output", help="output folder")
    na.add_argument("--mode", choices=["mcd", "scd"], help="mcd: multi-layer coordinate descent (NetAdaptV2); scd: "
                                                           "single-layer with fine-tuning (NetAdapt v1)")
    na.add_argument("--base", help="best | vanilla (from the replicate/split search in the output folder), or a "
                                   "model.pt / spec .json")
    na.add_argument("overrides", nargs="*", metavar="key=value")
    na.set_defaults(func=_search_netadapt)
    lut = sub.add_parser("lut", help="measure a per-layer latency lookup table on this machine (JSON), checked "
                                     "against whole networks")
    lut.add_argument("--config", help="search YAML whose train config gives the network (default network otherwise)")
    lut.add_argument("--spec", help="an ArchSpec JSON instead")
    lut.add_argument("--model", help="a model.pt instead")
    lut.add_argument("--out", required=True, help="LUT JSON to write (an existing one is extended)")
    lut.add_argument("--g", type=int, default=8, help="width granularity of the swept widths")
    lut.add_argument("--no-sweep", action="store_true", help="only the network's own layers, not every width")
    lut.add_argument("--check", type=int, default=4, help="networks measured whole to check the table")
    lut.add_argument("--threads", type=int, default=1)
    lut.add_argument("--batch", type=int, default=1)
    lut.add_argument("--runs", type=int, default=20)
    lut.add_argument("--rounds", type=int, default=2)
    lut.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the search config")
    lut.set_defaults(func=_search_lut)
    rp = sub.add_parser("report", help="table, Pareto plots (PNG) and best.json of a search folder")
    rp.add_argument("folder", help="the search's output folder")
    rp.set_defaults(func=_search_report)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_data_parser, add_train_parser, add_eval_parser, add_export_parser, add_demo_parser, add_search_parser]


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
