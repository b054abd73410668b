"""The `evomerge` command line: one subcommand per job, each a thin shell around the library.

Bad input raises ``EvomergeError`` (or a pydantic ``ValidationError``) anywhere below; ``main`` turns it
into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from evaluators.lm_eval_evaluator import offline_defaults
from merge_core.errors import EvomergeError
from search.cli import demo, eval, merge, report, search, zoo
from search.cli.demo import demo_figures

__all__ = ["build_parser", "demo_figures", "main"]

SUBCOMMANDS = [merge.add, search.add, eval.add, report.add, zoo.add, demo.add]


class _Parser(argparse.ArgumentParser):
    """A bad flag is reported like any other bad input: one line and exit 2 (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evomerge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except EvomergeError as exc:
        print(f"evomerge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused: a read-only or full disk, a file where a directory goes
        where = ", ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        print(f"evomerge {args.command}: error: {where + ': ' if where else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"evomerge {args.command}: interrupted", file=sys.stderr)
        return 130
