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


# Other subcommands (train, eval, export, search, bench, demo) add their add_<cmd>_parser here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_data_parser]


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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
