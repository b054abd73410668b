"""`evomerge zoo`: build the demo family, or regenerate its task files."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

from merge_core.checkpoint import check_writable_dir
from merge_core.errors import EvomergeError


@contextmanager
def no_stray_lock(directory: str | Path):
    """A refused zoo directory keeps no lock file that the refusal itself made."""
    lock = Path(directory) / ".lock"
    existed = lock.exists()
    try:
        yield
    except EvomergeError:
        if not existed:
            lock.unlink(missing_ok=True)
        raise


def cmd_zoo_build(args: argparse.Namespace) -> None:
    from search import demo

    log = (lambda message: None) if args.quiet else print
    check_writable_dir(args.dir, "zoo directory")
    with no_stray_lock(args.dir):
        family = demo.build_zoo(args.dir, log=log)
    print(demo.summary(family))
    if args.moe_ready:
        for skill, expert in demo.ensure_moe_ready_experts(family, log).items():
            print(f"moe-ready expert {skill}: {expert['path']} (test split, {skill}: {expert['scores'][skill]:.2f})")


def add(sub) -> None:
    from search import demo

    p = sub.add_parser("zoo", help="the demo model family: a tiny Llama base and one fine-tune per skill")
    actions = p.add_subparsers(dest="zoo_command", required=True, metavar="{build,tasks}")
    build = actions.add_parser("build", help="train the family on CPU in minutes (cached: returns at once when built)")
    build.add_argument("dir", nargs="?", default=str(demo.DEFAULT_ZOO_DIR),
                       help=f"output directory (default: {demo.DEFAULT_ZOO_DIR})")
    build.add_argument("--quiet", action="store_true", help="no training log")
    build.add_argument("--moe-ready", action="store_true",
                       help="also fine-tune experts for a mixture of experts (MLPs only, a few minutes) "
                            "into DIR/moe_ready")
    build.set_defaults(func=cmd_zoo_build)
    tasks = actions.add_parser("tasks", help="regenerate the lm-eval task YAMLs and JSONL splits of the zoo's skills")
    tasks.add_argument("dir", nargs="?", default=str(demo.TASKS_DIR), help="task directory (default: configs/tasks)")
    tasks.set_defaults(func=cmd_zoo_tasks)


def cmd_zoo_tasks(args: argparse.Namespace) -> None:
    from search import demo

    check_writable_dir(args.dir, "task directory")
    print(f"wrote {len(demo.write_tasks(args.dir))} files under {args.dir}")
