"""The ``vitlens`` command: demo, explain, bench, capture, train-zoo.

Each subcommand lives with the code it drives; this module only parses the
command line and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(argv: Sequence[str]) -> int:
    from .demo import main

    return main(argv)


def _explain(argv: Sequence[str]) -> int:
    from .explain_cli import main

    return main(argv)


def _bench(argv: Sequence[str]) -> int:
    from .metrics.bench import main

    return main(argv)


def _train_zoo(argv: Sequence[str]) -> int:
    from .zoo.train import main

    return main(list(argv)) or 0


COMMANDS = {
    "demo": (_demo, "explain shipped samples with every method; write figures and a metrics table"),
    "explain": (_explain, "explanation maps for your own images"),
    "bench": (_bench, "segmentation and perturbation scores for every method"),
    "train-zoo": (_train_zoo, "retrain a shipped model (vit-shapes, swin-shapes)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vitlens`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="vitlens",
        description="Open Vision Transformers up: capture, explain, evaluate.",
        epilog="Run 'vitlens COMMAND --help' for a command's options.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    parser.add_argument("--version", action="version", version=_version())
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv)
        return 0
    args = parser.parse_args(argv[:1])
    from .errors import VitlensError

    try:
        return int(COMMANDS[args.command][0](argv[1:]) or 0)
    except VitlensError as exc:  # an error may carry its advice in command-line words (--checkpoint, not checkpoint=)
        print(f"vitlens {args.command}: {getattr(exc, 'cli_message', None) or exc}", file=sys.stderr)
        return 2


def _version() -> str:
    from ._version import __version__

    return f"vitlens {__version__}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
