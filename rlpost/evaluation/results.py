"""Writing evaluation results (results.json, samples.jsonl, results.md) and comparing two runs.

Two runs differ significantly at the 95% level when their intervals are disjoint; overlapping
intervals do not prove the runs equal (`metrics.intervals_overlap`). The comparison lists the
settings that differ, since a difference in limit, decoding or template changes the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlpost.errors import UserError
from rlpost.evaluation.metrics import Estimate, intervals_overlap

RESULTS, SAMPLES, MARKDOWN = "results.json", "samples.jsonl", "results.md"
_COMPARED_SETTINGS = ("benchmark", "benchmark_options", "rows", "limit", "n_samples", "num_fewshot",
                      "decoding", "chat_template", "seed", "oracle")


def write_results(result: Any, out_dir: str | Path) -> Path:
    """Write `result` (an EvalResult) as results.json, samples.jsonl and results.md in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = result.to_json()
    (out / RESULTS).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    with open(out / SAMPLES, "w", encoding="utf-8") as handle:
        for sample in result.samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
    (out / MARKDOWN).write_text(markdown(document), encoding="utf-8")
    return out


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json document, from its path or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise UserError(f"results file {path} does not exist; pass a results.json or its directory")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg})") from err
    if not isinstance(document, dict) or not isinstance(document.get("figures"), dict):
        raise UserError(f"{path} is not an rlpost eval results.json (no 'figures')")
    return document


def _interval(figure: dict[str, Any]) -> str:
    return f"[{figure['low']:.4f}, {figure['high']:.4f}]"


def markdown(document: dict[str, Any]) -> str:
    """A markdown report: one table row per figure, then the settings."""
    config = document["config"]
    model = "oracle (references)" if config.get("oracle") else config.get("model")
    level = round(100 * config.get("confidence", 0.95))
    lines = [f"# {config['benchmark']}: {model}", "",
             f"| metric | value | {level}% interval | n (prompts) | interval method |",
             "|---|---|---|---|---|"]
    for name, fig in document["figures"].items():
        lines.append(f"| {name} | {fig['value']:.4f} | {_interval(fig)} | {fig['n']} | {fig['method']} |")
    lines += ["", "## Settings", ""]
    for key, value in config.items():
        lines.append(f"- {key}: `{json.dumps(value)}`")
    failures = document.get("oracle_failures") or []
    if failures:
        lines += ["", f"## Oracle failures ({len(failures)})", ""]
        lines += [f"- row {f['row']}" + (f" ({f['id']})" if f.get("id") is not None else "")
                  + f": score {f['score']}" for f in failures]
    return "\n".join(lines) + "\n"


def _estimate(figure: dict[str, Any]) -> Estimate:
    return Estimate(figure["value"], figure["low"], figure["high"], figure["n"], figure["method"])


def _label(config: dict[str, Any]) -> str:
    return "oracle" if config.get("oracle") else str(config.get("model"))


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Side-by-side figures of two results documents, B - A, and whether the intervals overlap."""
    ca, cb = a["config"], b["config"]
    lines = [f"A: {_label(ca)} on {ca['benchmark']} ({ca['rows']} rows)",
             f"B: {_label(cb)} on {cb['benchmark']} ({cb['rows']} rows)"]
    for key in _COMPARED_SETTINGS:
        if ca.get(key) != cb.get(key):
            lines.append(f"warning: {key} differs: A={json.dumps(ca.get(key))} B={json.dumps(cb.get(key))}")
    shared = [name for name in a["figures"] if name in b["figures"]]
    if not shared:
        raise UserError("the two results have no figure in common; compare runs of the same benchmark")
    width = max(len(n) for n in shared)
    lines.append(f"{'metric':<{width}}  {'A':<26}  {'B':<26}  {'B - A':>8}  intervals")
    for name in shared:
        fa, fb = a["figures"][name], b["figures"][name]
        overlap = intervals_overlap(_estimate(fa), _estimate(fb))
        verdict = "overlap (no significant difference shown)" if overlap else "disjoint (significant)"
        cell_a = f"{fa['value']:.4f} {_interval(fa)}"
        cell_b = f"{fb['value']:.4f} {_interval(fb)}"
        lines.append(f"{name:<{width}}  {cell_a:<26}  {cell_b:<26}  {fb['value'] - fa['value']:>+8.4f}  {verdict}")
    only = sorted(set(a["figures"]) ^ set(b["figures"]))
    if only:
        lines.append(f"in one run only: {', '.join(only)}")
    return "\n".join(lines)
