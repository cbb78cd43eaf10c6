"""The `muxserve` command: one subcommand per task, each implemented in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-models": ("muxserve.demo", "create the small random-weight demo checkpoints"),
    "generate": ("muxserve.generate_cli", "generate offline with the engine (no server)"),
    "plan": ("placement.cli", "place models on GPUs: ILP, greedy, spatial, temporal"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muxserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from muxserve.errors import MuxServeError

    try:
        return int(importlib.import_module(args._module).run(args))
    except MuxServeError as e:
        print(f"muxserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
