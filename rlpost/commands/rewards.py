"""`rlpost rewards list`: every available reward function with its one-line description."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=["list"], help="what to do")


def run(args) -> int:
    from rewards.registry import list_rewards

    rows = list_rewards()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    return 0
