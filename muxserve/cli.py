"""The `muxserve` command: one subcommand per task, each implemented in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from muxserve import __version__

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "make-models": ("muxserve.demo", "create the small random-weight demo checkpoints"),
    "generate": ("muxserve.generate_cli", "generate offline with the engine (no server)"),
    "plan": ("placement.cli", "place models on GPUs: ILP, greedy, spatial, temporal"),
    "serve": ("muxserve.server.cli", "serve every model of a config over the OpenAI HTTP API"),
    "bench": (
        "muxserve.bench.cli",
        "replay a workload trace against an endpoint; latency, goodput",
    ),
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default, unless it has none or its help names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == []
            or default == argparse.SUPPRESS
            or not action.option_strings
            or isinstance(action, argparse._VersionAction | argparse._HelpAction)
        ):
            return action.help
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported, so one command never pays for another."""
    parser = argparse.ArgumentParser(prog="muxserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"muxserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter
        )
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
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
