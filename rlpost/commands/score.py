"""`rlpost score --reward NAME --input FILE.jsonl --output OUT.jsonl`: check a reward on your own data."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("--reward", required=True, help="registered reward name or dotted import path")
    parser.add_argument("--input", required=True, help="JSONL rows with `completion` plus the columns the reward needs")
    parser.add_argument("--output", required=True, help="where to write the rows with a `reward` field added")
    parser.add_argument("--workers", type=int, default=2, help="reward worker processes")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call hard timeout in seconds")


def run(args) -> int:
    from rewards.offline import score_file

    summary = score_file(args.reward, args.input, args.output, workers=args.workers, timeout_s=args.timeout)
    print(json.dumps(summary))
    return 0
