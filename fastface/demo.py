"""`python -m fastface.demo`: the main job on the embedded default."""
from __future__ import annotations


def main() -> None:
    """Build the default RGB-D face ArchSpec and print its summary."""
    from rich.console import Console

    from fastface.arch import ArchSpec
    from fastface.eval.cost import summary_table
    from fastface.info import runtime_backends

    console = Console()
    spec = ArchSpec.face(split=1)
    console.print(summary_table(spec))
    console.print({k: v["usable"] for k, v in runtime_backends().items()})


if __name__ == "__main__":
    main()
