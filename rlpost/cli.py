"""The `rlpost` console command. Each subcommand lives in `rlpost/commands/<name>.py` and exposes
`add_arguments(parser)` and `run(args) -> int`. A `UserError` becomes one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from rlpost.errors import UserError

SUBCOMMANDS = {
    "run": "run a recipe (default: the quickstart): SFT -> async GRPO -> held-out evaluation",
    "rewards": "list the available reward functions",
    "score": "score completions in a JSONL file with any reward, offline",
    "eval": "evaluate a local policy on benchmarks with vLLM",
    "decontaminate": "report n-gram overlap between a training dataset and benchmarks",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlpost", description="RL post-training for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"rlpost.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except UserError as err:
        print(f"rlpost {args.command}: error: {err}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("rlpost: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
