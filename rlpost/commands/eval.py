"""`rlpost eval MODEL_DIR --benchmark NAME`: evaluate a local policy with vLLM and the benchmark's verifier.

Also:  `rlpost eval --benchmark gsm8k --oracle` (score the references: the verifier check),
       `rlpost eval MODEL --dataset FILE --verifier math --column prompt=question --column answer=final`,
       `rlpost eval --compare RESULTS_A RESULTS_B` (side by side, differences, interval overlap).
Writes results.json, samples.jsonl and results.md to --output-dir (default evals/<model>-<benchmark>/).
Exit codes: 0 done; 1 oracle mode found rows the verifier rejects; 2 bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rlpost.errors import UserError

_MAX_NAMED_FAILURES = 20
_TEMPLATE = {"auto": None, "on": True, "off": False}


def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", help="local model directory (omit with --oracle or --compare)")
    parser.add_argument("--benchmark", help="registered benchmark: addition, gsm8k, humaneval, ifeval")
    parser.add_argument("--dataset", help="your own benchmark: .jsonl, .parquet or save_to_disk directory")
    parser.add_argument("--verifier", help="with --dataset: math, addition, humaneval, ifeval or a reward name")
    parser.add_argument("--column", action="append", default=[], metavar="TARGET=SOURCE",
                        help="with --dataset: map a dataset column, e.g. prompt=question (repeatable)")
    parser.add_argument("--split", help="with --dataset: the split of a DatasetDict directory")
    parser.add_argument("--limit", type=int, help="evaluate the first N rows only")
    parser.add_argument("--n-samples", type=int, default=1, help="samples per prompt (pass@k, maj@k for k <= n)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--max-tokens", type=int, help="completion length limit (default per benchmark)")
    parser.add_argument("--num-fewshot", type=int, default=0, help="gsm8k: worked examples from the train split")
    parser.add_argument("--chat-template", choices=sorted(_TEMPLATE), default="auto",
                        help="wrap prompts in the tokenizer's chat template (auto: if it has one)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (engine) and bootstrap seed")
    parser.add_argument("--oracle", action="store_true",
                        help="score each row's reference instead of model output; exit 1 unless all pass")
    parser.add_argument("--task-config", help="addition: the run's recipe.json (found automatically for "
                                              "models inside a run directory)")
    parser.add_argument("--output-dir", help="where to write results (default evals/<model>-<benchmark>/)")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype (auto, float32, bfloat16, ...)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vLLM on CUDA only")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two results.json (or dirs)")


def _column_map(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        target, sep, source = pair.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise UserError(f"--column {pair!r} is not TARGET=SOURCE, e.g. --column prompt=question")
        mapping[target.strip()] = source.strip()
    return mapping


def _dataset(args) -> tuple[Any, dict[str, Any]]:
    from rlpost.evaluation.benchmarks import load_user_dataset

    if args.benchmark:
        raise UserError("give either --benchmark or --dataset, not both")
    if not args.verifier:
        raise UserError(f"--dataset {args.dataset} needs --verifier NAME (math, addition, humaneval, ifeval)")
    columns = _column_map(args.column)
    bench = load_user_dataset(args.dataset, args.verifier, columns, args.split)
    return bench, {"dataset": {"path": str(Path(args.dataset).resolve()), "verifier": args.verifier,
                               "columns": columns, "split": args.split}}


def _addition_options(args) -> tuple[dict[str, Any], int | None, Path | None]:
    from rlpost.evaluation.addition import find_run_config, task_options

    path = Path(args.task_config) if args.task_config else None
    if path is None and args.model:
        path = find_run_config(args.model)
    if path is None:
        print("addition: no run recipe.json found; using the quickstart's default task settings "
              "(pass --task-config RUN/recipe.json to match a run)", file=sys.stderr)
        return {}, None, None
    options, max_tokens = task_options(path)
    print(f"addition: task settings from {path}", file=sys.stderr)
    return options, max_tokens, path.resolve()


def _benchmark(args) -> tuple[Any, dict[str, Any], int | None, dict[str, Any]]:
    """(name or Benchmark, loader options, default max_tokens, extra config to record)."""
    from rlpost.evaluation.benchmarks import benchmark_names

    if args.dataset:
        bench, extra = _dataset(args)
        return bench, {}, None, extra
    if not args.benchmark:
        raise UserError(f"give --benchmark NAME ({', '.join(benchmark_names())}) or --dataset PATH")
    if args.benchmark not in benchmark_names():
        raise UserError(f"unknown benchmark {args.benchmark!r}; known benchmarks: {', '.join(benchmark_names())}")
    if args.benchmark != "addition":
        if args.task_config:
            raise UserError("--task-config applies to --benchmark addition only; drop it")
        return args.benchmark, {}, None, {}
    options, max_tokens, path = _addition_options(args)
    return "addition", options, max_tokens, {"task_config": str(path) if path else None}


def _default_output_dir(model: str | None, benchmark: str, task_config: str | None) -> Path:
    """evals/<model-name>-<benchmark>; a policy inside a run directory is named after the run."""
    if model is None:
        return Path("evals") / f"oracle-{benchmark}"
    path = Path(model).resolve()
    name = path.name
    if task_config and path.is_relative_to(Path(task_config).parent):
        run = Path(task_config).parent
        parts = [p for p in path.relative_to(run).parts if p not in ("policy", "checkpoints")]
        name = "-".join([run.name, *parts])
    return Path("evals") / f"{name}-{benchmark}"


def _prompts(args, task_config: str | None) -> dict[str, Any]:
    """How prompts are formatted: the run's own prompt format (data.prompt of the `task_config` run)
    where it has one, which held-out prompts keep, else --chat-template."""
    from rlpost.evaluation.addition import run_prompt_format

    fmt = run_prompt_format(task_config) if task_config else None
    if fmt is None:
        return {"use_chat_template": _TEMPLATE[args.chat_template]}
    if args.chat_template != "auto":
        raise UserError(f"{task_config} sets the run's prompt format (data.prompt), which held-out prompts keep; "
                        f"drop --chat-template {args.chat_template}")
    return {"prompt_format": fmt}


def _row_name(index: int, row_id: Any) -> str:
    return f"row {index}" if row_id is None else f"row {index} ({row_id})"


def _report_oracle_failures(result) -> int:
    failed = result.failed_rows
    if not failed:
        print(f"oracle check passed: the verifier accepts all {result.config['rows']} references")
        return 0
    named = ", ".join(_row_name(i, result.samples_of(i)[0]["id"]) for i in failed[:_MAX_NAMED_FAILURES])
    more = f" and {len(failed) - _MAX_NAMED_FAILURES} more" if len(failed) > _MAX_NAMED_FAILURES else ""
    print(f"oracle check failed: {len(failed)} of {result.config['rows']} references score below 1: "
          f"{named}{more}", file=sys.stderr)
    return 1


def run(args) -> int:
    from rlpost.evaluation.results import compare, load_results, markdown, write_results
    from rlpost.evaluation.runner import check_model_dir, evaluate

    if args.compare:
        print(compare(load_results(args.compare[0]), load_results(args.compare[1])))
        return 0
    if not args.oracle:
        if not args.model:
            raise UserError("give a model directory to evaluate, or --oracle to check the references")
        check_model_dir(args.model)
    benchmark, options, task_max_tokens, extra = _benchmark(args)
    result = evaluate(
        None if args.oracle else args.model, benchmark, limit=args.limit, n_samples=args.n_samples,
        temperature=args.temperature, max_tokens=args.max_tokens or task_max_tokens,
        num_fewshot=args.num_fewshot, seed=args.seed, oracle=args.oracle, top_p=args.top_p,
        benchmark_options=options, dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
        **_prompts(args, extra.get("task_config")))
    result.config.update(extra)
    out = Path(args.output_dir) if args.output_dir else _default_output_dir(
        result.config["model"], result.config["benchmark"], extra.get("task_config"))
    write_results(result, out)
    print(markdown(result.to_json()).split("\n## Settings")[0].rstrip())
    print(f"wrote {out / 'results.json'}, samples.jsonl, results.md")
    return _report_oracle_failures(result) if args.oracle else 0
