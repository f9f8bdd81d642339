"""Run a recipe: starting policy -> evaluation -> each stage in order, evaluated after each -> report.

    RUN/recipe.json            the recipe's settings; a resume with changed settings is refused
    RUN/initial/policy         the built model (model.build) — with model.path the directory itself
    RUN/<stage>/policy         each stage's output, the next stage's input
    RUN/<stage>/stage.json     written when the stage finished; a rerun skips finished stages
    RUN/evals/<point>.json     every `eval` entry at 'initial' and after each stage, with 95% intervals
    RUN/summary.json, RUN/training.png, RUN/tensorboard/ (RL stages), printed report

Killed at any point, the same command continues: finished stages and evaluations are kept, an RL
stage resumes from its newest checkpoint. A finished run's command says so and prints its report.

Under `accelerate launch` (several learner ranks, recipes/accelerate/README.md) the main rank runs
all of this and the others only train: each GRPO stage's learner is data parallel across the ranks
(`rlpost.loop.follow_rl`), and the evaluations at 'initial' and after each stage run in a process the
main rank spawns (a vLLM engine does not start inside a rank's own process once its process group is
up). Stages other than GRPO train on one process only, so a launch on several ranks refuses a recipe
that still has one to run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rlpost.errors import UserError
from rlpost.recipe import changed_keys, flat_settings, section_defaults, stage_defaults, where

# may differ between the first run and a resume: where the run lives, and how many rollout workers
# (on which backend) generate its batches, which changes nothing of what is trained
_FREE_KEYS = ("run_dir", "rollout.workers", "rollout.backend", "rollout.max_restarts", "rollout.weight_transport",
              "ray.address", "ray.cpus_per_worker")


def run_recipe(recipe: Any) -> dict:
    """Run (or continue) every stage of `recipe`; returns the summary (on the main rank; {} on the others)."""
    from rlpost.distributed import Context, launched_world_size

    if launched_world_size() == 1:
        return _run_stages(recipe, Context())
    dist = Context.for_run(resolve_device(recipe.model.device))
    sharded = str(dist.accelerator.distributed_type.value)
    if sharded in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):  # on every rank, before any collective
        raise UserError(f"rlpost run trains on several learner processes with DDP only (recipes/accelerate/"
                        f"ddp_cpu.yaml, ddp_gpu.yaml); this launch is {sharded}, whose sharded weights and optimiser "
                        f"state the main rank cannot publish or checkpoint alone yet")
    check_stages_for_ranks(recipe, dist.world_size)
    if not dist.is_main:
        from rlpost.loop import follow_rl

        follow_rl(dist)
        return {}
    try:
        return _run_stages(recipe, dist)
    finally:
        dist.broadcast_object(None)  # the other ranks leave, also when this one stops on an error


def check_stages_for_ranks(recipe: Any, world: int) -> None:
    """Refuse (UserError) a launch on `world` > 1 learner ranks while a stage that cannot train on
    them is still to run: any stage but grpo, a LoRA grpo stage, or one whose batch does not split
    evenly over the ranks."""
    for entry in recipe.stage_entries:
        if (Path(recipe.run_dir) / entry.name / "stage.json").exists():
            continue
        cfg = getattr(recipe, entry.name)
        if entry.type != "grpo" or cfg.lora is not None:
            what = f"a {entry.type} stage" if entry.type != "grpo" else "a LoRA grpo stage"
            raise UserError(f"stage '{entry.name}' is {what}, which trains on one process only; only full-weight "
                            f"grpo stages train on several learner processes. Run the recipe with one process "
                            f"(rlpost run, the same recipe and run_dir) until that stage is done, then launch "
                            f"the rest with accelerate")
        if cfg.prompts_per_step % (cfg.steps_per_generation * world):
            raise UserError(f"{where(recipe, f'{entry.name}.prompts_per_step')}: key '{entry.name}.prompts_per_step' "
                            f"({cfg.prompts_per_step}) must divide by steps_per_generation x learner processes "
                            f"({cfg.steps_per_generation} x {world}): each process trains on an equal share of "
                            f"every mini-batch")


def _run_stages(recipe: Any, dist: Any) -> dict:
    from rlpost.stages import STAGES, StageContext
    from rlpost.training_data import TrainingData

    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(run_dir, recipe)
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"run {run_dir} is complete; its report (delete {run_dir / 'evals'} and {run_dir / 'summary.json'} "
              f"to evaluate again, or pass a new run_dir=... to train again):")
        print(format_report(summary))
        return summary
    import torch

    torch.set_num_threads(recipe.model.threads)
    data = TrainingData(recipe.data, recipe.seed)
    device = str(dist.device) if dist.world_size > 1 else resolve_device(recipe.model.device)
    spawn_evaluations = dist.world_size > 1
    policy = initial_policy(recipe, run_dir)
    points = ["initial"]
    records: dict[str, dict] = {}
    evaluations = {"initial": evaluate_point(recipe, data, policy, run_dir, "initial", spawn_evaluations)}
    for entry in recipe.stage_entries:
        out_dir = run_dir / entry.name
        done = out_dir / "stage.json"
        if done.exists():
            records[entry.name] = json.loads(done.read_text())
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            print(f"stage '{entry.name}' ({entry.type}) from {policy}")
            ctx = StageContext(recipe, entry.name, Path(policy), out_dir, data, device,
                               engine_settings=engine_settings(recipe),
                               evaluate=in_stage_evaluation(recipe, data, Path(policy)), dist=dist)
            start = time.perf_counter()
            record = STAGES[entry.type].run(getattr(recipe, entry.name), ctx)
            record = {"type": entry.type, "wall_s": time.perf_counter() - start, **record}
            write_json(done, record)
            records[entry.name] = record
        policy = out_dir / "policy"
        points.append(entry.name)
        evaluations[entry.name] = evaluate_point(recipe, data, policy, run_dir, entry.name, spawn_evaluations)
    summary = summarize(recipe, run_dir, records, evaluations, points)
    write_json(run_dir / "summary.json", summary)
    plot(run_dir, summary)
    print(format_report(summary))
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir})")
    return summary


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is 'cuda' but torch sees no CUDA device; use model.device=auto or cpu")
    return device


def engine_settings(recipe: Any):
    from rollouts.engine import EngineSettings

    m = recipe.model
    limit = m.max_model_len or (m.build.max_positions if m.build else _model_positions(m.path))
    return EngineSettings(max_model_len=limit, dtype=m.dtype, gpu_memory_utilization=m.gpu_memory_utilization,
                          seed=recipe.seed)


def _model_positions(path) -> int:
    from transformers import AutoConfig

    return min(4096, getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 4096) or 4096)


def initial_policy(recipe: Any, run_dir: Path) -> Path:
    """`model.path`, or the built-in model built (once) into RUN/initial/policy."""
    if recipe.model.path is not None:
        return Path(recipe.model.path).expanduser().resolve()
    target = run_dir / "initial" / "policy"
    if not (target / "config.json").exists():
        from rlpost.modeling import ModelShape, build_model, build_tokenizer, save_pretrained

        b = recipe.model.build
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, ModelShape(b.hidden_size, b.num_layers, b.num_heads, b.num_kv_heads,
                                                  b.intermediate_size, b.max_positions, b.dropout), seed=recipe.seed)
        save_pretrained(model, tokenizer, target)
    return target


# ----------------------------------------------------------------------------- evaluation

def load_eval_benchmark(spec: Any, data: Any):
    """The benchmark an `eval` entry names, as rows the runner scores."""
    from rlpost.evaluation.benchmarks import load_benchmark, load_user_dataset

    if spec.benchmark == "held_out":
        return data.held_out(spec.limit)
    path = Path(spec.benchmark)
    if path.suffix in (".jsonl", ".parquet") or path.is_dir():
        if not spec.verifier:
            raise UserError(f"eval entry {spec.benchmark!r}: a dataset needs a 'verifier' (math, addition, ...)")
        return load_user_dataset(path, spec.verifier, spec.columns).head(spec.limit)
    return load_benchmark(spec.benchmark, limit=spec.limit)


def _evaluate(recipe: Any, data: Any, spec: Any, policy: Path, engine=None) -> dict:
    from rlpost.evaluation.runner import evaluate

    m = recipe.model
    result = evaluate(policy, load_eval_benchmark(spec, data), max_tokens=spec.max_tokens, n_samples=spec.n_samples,
                      temperature=spec.temperature, seed=recipe.seed, dtype=m.dtype,
                      gpu_memory_utilization=m.gpu_memory_utilization, prompt_format=data.format, engine=engine,
                      max_model_len=engine_settings(recipe).max_model_len if engine is None else None)
    acc = result.figures["accuracy"]
    return {"accuracy": acc["value"], "low": acc["low"], "high": acc["high"], "n": acc.get("n"),
            "method": acc.get("method"), "figures": result.figures}


def evaluate_point(recipe: Any, data: Any, policy: Path, run_dir: Path, point: str, spawn: bool = False) -> dict:
    """Every `eval` entry on `policy`, cached in RUN/evals/<point>.json; with `spawn`, in a process of
    its own (the main rank of several, see the module docstring)."""
    path = run_dir / "evals" / f"{point}.json"
    if path.exists():
        return json.loads(path.read_text())
    if spawn:
        import multiprocessing

        child = multiprocessing.get_context("spawn").Process(
            target=_evaluate_point_in_child, args=(recipe.source, recipe.overrides, str(policy), str(run_dir), point),
            name=f"rlpost-eval-{point}")
        child.start()
        child.join()
        if child.exitcode != 0 or not path.exists():
            raise RuntimeError(f"the evaluation at '{point}' failed in its own process (exit code {child.exitcode}); "
                               f"its error is printed above")
        return json.loads(path.read_text())
    results = {}
    for spec in recipe.eval:
        results[spec.label] = _evaluate(recipe, data, spec, policy)
        r = results[spec.label]
        print(f"eval {point:>10} {spec.label}: {100 * r['accuracy']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]")
    write_json(path, results)
    return results


def _evaluate_point_in_child(source: str, overrides: list[str], policy: str, run_dir: str, point: str) -> None:
    import torch

    from rlpost.recipe import load_recipe
    from rlpost.training_data import TrainingData

    recipe = load_recipe(source, overrides)
    torch.set_num_threads(recipe.model.threads)
    evaluate_point(recipe, TrainingData(recipe.data, recipe.seed), Path(policy), Path(run_dir), point)


def in_stage_evaluation(recipe: Any, data: Any, policy_in: Path):
    """The first `eval` entry, run on an RL stage's rollout engine every `eval_steps` (same runner).
    The weights are the engine's; `policy_in` (the stage's input) gives tokenizer and config."""
    if not recipe.eval:
        return None
    spec = recipe.eval[0]

    def run(engine, tag: str) -> dict:
        return _evaluate(recipe, data, spec, policy_in, engine=engine)

    return run


# ----------------------------------------------------------------------------- report

def summarize(recipe: Any, run_dir: Path, records: dict, evaluations: dict, points: list[str]) -> dict:
    """Per-point evaluations with intervals, the gain of each stage over the one before, stage records."""
    table = {}
    for label in (spec.label for spec in recipe.eval):
        row = {p: {k: evaluations[p][label][k] for k in ("accuracy", "low", "high", "n")} for p in points}
        gains = {}
        for before, after in zip(points, points[1:]):
            a, b = row[before], row[after]
            gains[after] = {"gain_points": 100 * (b["accuracy"] - a["accuracy"]),
                            "intervals_overlap": not (b["low"] > a["high"] or a["low"] > b["high"])}
        table[label] = {"points": row, "gains": gains, "interval": "95%"}
    stages = {name: {k: v for k, v in rec.items() if k not in ("history",)} for name, rec in records.items()}
    return {"recipe": recipe.source, "run_dir": str(run_dir), "seed": recipe.seed, "evaluations": table,
            "stages": stages, "points": points}


def format_report(summary: dict) -> str:
    lines = []
    for label, t in summary["evaluations"].items():
        lines.append(f"{label} (95% intervals):")
        for point, e in t["points"].items():
            gain = t["gains"].get(point)
            extra = (f"  {gain['gain_points']:+.1f} points, intervals overlap: {gain['intervals_overlap']}"
                     if gain else "")
            lines.append(f"  {point:>10}  {100 * e['accuracy']:5.1f}% [{100 * e['low']:.1f}, {100 * e['high']:.1f}]"
                         f"  n={e['n']}{extra}")
    for name, rec in summary["stages"].items():
        facts = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                          if isinstance(v, (int, float, bool, str)) and k != "type")
        lines.append(f"stage {name} ({rec.get('type')}): {facts}")
    return "\n".join(lines)


def plot(run_dir: Path, summary: dict) -> Path | None:
    """training.png: accuracy with intervals at every point, and the RL curves where a stage logged them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlpost.report import JsonlLog

    curves = []
    for name, record in summary["stages"].items():
        stage_file = run_dir / name / "stage.json"
        history = json.loads(stage_file.read_text()).get("history") if stage_file.exists() else None
        if (run_dir / name / "metrics.jsonl").exists():  # an RL stage
            curves.append((name, "rl", JsonlLog(run_dir / name / "metrics.jsonl").rows()))
        elif record.get("type") == "sft" and history:  # [epoch, validation accuracy] pairs
            curves.append((name, "sft", [{"epoch": e, "val/accuracy": a} for e, a in history]))
        elif record.get("type") == "dpo" and history:  # TRL's logged windows
            curves.append((name, "dpo", [{"step": h["step"], "train/loss": h["loss"],
                                          "dpo/accuracy": h.get("rewards/accuracies")}
                                         for h in history if h.get("loss") is not None]))
    fig, axes = plt.subplots(1, 1 + len(curves), figsize=(5 * (1 + len(curves)), 3.6), squeeze=False)
    ax = axes[0][0]
    for label, t in summary["evaluations"].items():
        pts = list(t["points"].values())
        xs = range(len(pts))
        ax.errorbar(xs, [100 * p["accuracy"] for p in pts],
                    yerr=[[100 * (p["accuracy"] - p["low"]) for p in pts], [100 * (p["high"] - p["accuracy"]) for p in pts]],
                    marker="o", capsize=4, label=label)
        ax.set_xticks(list(xs), list(t["points"]))
    ax.set_ylabel("accuracy % (95% interval)")
    ax.set_title("after each stage")
    ax.legend()
    for ax, (name, kind, rows) in zip(axes[0][1:], curves):
        if kind == "sft":  # validation accuracy per epoch
            ax.plot([r["epoch"] for r in rows], [r["val/accuracy"] for r in rows], marker="o", label="validation accuracy")
            ax.set_xlabel("epoch")
            ax.set_title(f"stage {name}")
            ax.legend()
            continue
        if kind == "dpo":  # loss and pairwise accuracy on its batches
            ax.plot([r["step"] for r in rows], [r["train/loss"] for r in rows], label="DPO loss")
            ax.plot([r["step"] for r in rows], [r["dpo/accuracy"] for r in rows], label="batch pair accuracy")
            ax.set_xlabel("step")
            ax.set_title(f"stage {name}")
            ax.legend()
            continue
        r = [(row["step"], row["train/reward_mean"]) for row in rows if "train/reward_mean" in row]
        e = [(row["step"], row["eval/accuracy"]) for row in rows if "eval/accuracy" in row]
        if r:
            ax.plot(*zip(*r), label="batch reward", alpha=0.6)
        if e:
            ax.plot(*zip(*e), marker="o", label="held-out accuracy")
        ax.set_xlabel("step")
        ax.set_title(f"stage {name}")
        ax.legend()
    fig.tight_layout()
    out = run_dir / "training.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _check_same_recipe(run_dir: Path, recipe: Any) -> None:
    """Refuse to continue a run with different settings (naming the keys); record them on first start."""
    path = run_dir / "recipe.json"
    settings = flat_settings(recipe)
    if path.exists():
        old = json.loads(path.read_text())
        new = json.loads(json.dumps(settings, default=str))
        defaults = json.loads(json.dumps(section_defaults() | stage_defaults(recipe), default=str))
        # a key that a newer rlpost added (e.g. data.task.digits), left at its default, changes nothing the run did
        changed = [k for k in changed_keys(old, new, _FREE_KEYS)
                   if not (k not in old and k in defaults and new.get(k) == defaults[k])]
        if changed:
            shown = ", ".join(f"{k} ({old.get(k, '<absent>')!r} -> {settings.get(k, '<absent>')!r})" for k in changed[:5])
            raise UserError(f"{run_dir} holds a run of a different recipe: changed {shown}; "
                            f"use a new run_dir=... or restore those settings")
        return
    write_json(path, settings)


def write_json(path: Path, data: Any) -> None:
    """Write atomically (temporary file, then rename): a run killed mid-write leaves no half file,
    so the markers that tell a rerun what is done (stage.json, evals/, summary.json) are whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
