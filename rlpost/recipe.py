"""Recipes: the YAML a user runs with `rlpost run RECIPE.yaml [key=value ...]`.

A recipe has a `model`, `data`, `eval` and an ordered list of `stages`:

    run_dir: runs/mine
    seed: 0
    model: {path: /models/my-instruct-model, dtype: bfloat16}    # or build: {...} for the tiny built-in
    data: {source: prompts.jsonl, columns: {prompt: question}}
    eval: [{benchmark: gsm8k, limit: 200}]
    stages:
      - {type: sft, learning_rate: 1.0e-3}
      - {type: grpo, max_steps: 100, rewards: [math_accuracy]}

Every stage starts from the previous stage's output policy (the first from `model`) and writes
`RUN/<stage name>/`. A stage's `name` defaults to its `type`; its keys are the fields of the
stage type's config dataclass (`rlpost.stages.STAGES`), and where a stage wraps a TRL trainer they
carry that TRL config's field names. Overrides address stages by name: `grpo.max_steps=50`.

Internally the recipe becomes one dataclass whose fields are the fixed sections plus one field per
stage, so loading, overrides, type checks and `--help-config` are those of `rlpost.config`.
Checks of ranges and relations between keys run here too, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlpost.config import build_config, config_help, read_yaml, setting, to_dict
from rlpost.errors import UserError
from rlpost.prompting import PromptFormat

FIXED_SECTIONS = ("run_dir", "seed", "model", "data", "eval", "stages")


@dataclass
class BuildSection:
    """The built-in tiny Qwen2 with a character tokenizer (see `rlpost.modeling`)."""

    hidden_size: int = setting(256, "model width")
    num_layers: int = setting(2, "transformer layers")
    num_heads: int = setting(8, "attention heads (head_dim = hidden_size / num_heads must be >= 32 for vLLM on CPU)")
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention)")
    intermediate_size: int = setting(768, "MLP width")
    max_positions: int = setting(64, "longest sequence (prompt + completion) in tokens")
    dropout: float = setting(0.0, "attention dropout (RL stages switch it off)")


@dataclass
class ModelSection:
    path: Path | None = setting(None, "a local causal-LM directory that transformers loads (weights, tokenizer, chat template)")
    build: BuildSection | None = setting(None, "build the built-in tiny Qwen2 + character tokenizer instead of loading `path`")
    dtype: str = setting("float32", "weights dtype for learner and vLLM", choices=("float32", "bfloat16"))
    device: str = setting("auto", "learner device: auto = CUDA when present, else CPU", choices=("auto", "cpu", "cuda"))
    max_model_len: int | None = setting(None, "vLLM context length (default: the model's positions, at most 4096)")
    gpu_memory_utilization: float = setting(0.3, "fraction of GPU memory vLLM may take (CUDA only)")
    threads: int = setting(1, "torch CPU threads of the learner and of the rollout worker, each")
    learner_threads: int | None = setting(None, "torch CPU threads of the learner (RL stages) if not `threads`: "
                                                "e.g. 2 on 2 cores lets the learner take the core the rollout "
                                                "worker leaves idle (docs/benchmarks.md, async step time)")


@dataclass
class TaskSection:
    """The built-in addition task (`rlpost.tasks.arithmetic`), used when `data.source` is 'task'."""

    max_operand: int = setting(99, "operands are integers in [0, max_operand]")
    held_out_percent: int = setting(12, "percent of all operand pairs reserved for evaluation only (12: 1188 pairs)")
    carry_slip: float = setting(0.75, "probability that the SFT demonstrator forgets a carry")
    reverse: bool = setting(True, "numbers zero-padded, least significant digit first (57+68=125 -> 75+86=521)")
    digits: int | None = setting(None, "long answers: operands of exactly this many digits, drawn instead of "
                                       "enumerated (max_operand unused); the answer has digits + 1")
    carries: float = setting(1.0, "with digits: expected carries per problem, in (0, digits]; each column "
                                  "carries with probability carries / digits and never cascades")
    kind: str = setting("addition", "'addition' or 'counting' (count up by one from the prompt's number: "
                                    "`numbers` numbers of `digits` digits; rlpost/tasks/counting.py)")
    numbers: int = setting(6, "counting: how many numbers the answer lists")


@dataclass
class DataSection:
    source: str = setting("task", "'task' (the built-in task), a vendored split (gsm8k-train, gsm8k-test, ifeval), "
                                  "or a .jsonl / .parquet / save_to_disk path")
    split: str | None = setting(None, "split of a save_to_disk DatasetDict")
    columns: dict[str, str] = setting({}, "target -> dataset column, e.g. {prompt: question}; other columns reach rewards")
    task: TaskSection = setting(TaskSection, "the built-in task's settings")
    prompt: PromptFormat = setting(PromptFormat, "how a row becomes the prompt, for rollouts, SFT and evaluation alike")
    decontaminate_against: list[str] = setting([], "benchmarks ('NAME' or 'NAME:FIELD') to 8-gram-check the training rows against")


@dataclass
class EvalSpec:
    benchmark: str = setting("held_out", "'held_out' (the task's held-out prompts), addition, gsm8k, ifeval, "
                                         "humaneval, or a dataset path")
    name: str | None = setting(None, "label in reports (default: the benchmark)")
    limit: int | None = setting(None, "evaluate the first N rows only")
    max_tokens: int | None = setting(None, "completion budget (default: the benchmark's)")
    verifier: str | None = setting(None, "checker for a dataset path: math, addition, humaneval, ifeval or a reward name")
    columns: dict[str, str] = setting({}, "column mapping for a dataset path")
    n_samples: int = setting(1, "samples per prompt (pass@k for k <= n)")
    temperature: float = setting(0.0, "0 = greedy")

    @property
    def label(self) -> str:
        return self.name or (Path(self.benchmark).stem if "/" in self.benchmark or "." in self.benchmark
                             else self.benchmark)


@dataclass
class RolloutSection:
    workers: int = setting(1, "rollout workers, each with its own vLLM engine and reward pool; every batch is split "
                              "among them (docs/scaling.md)")
    backend: str = setting("process", "'process': workers are child processes of the learner; 'ray': Ray actors, on "
                                      "a local cluster or the one ray.address names (bash scripts/setup.sh ray)",
                           choices=("process", "ray"))
    max_restarts: int = setting(3, "worker deaths in a row, with no finished chunk between them, before the run stops "
                                   "(a dead worker is started again with the current weights)")
    weight_transport: str = setting("auto", "how weights reach Ray actors: shared memory on this node, Ray's object "
                                            "store on others ('auto'), or one of them for all",
                                    choices=("auto", "shared_memory", "object_store"))


@dataclass
class RaySection:
    address: str | None = setting(None, "none: start a local Ray cluster; 'auto' or 'ray://host:port': join a running one")
    cpus_per_worker: float = setting(1.0, "Ray CPUs each rollout actor reserves")


@dataclass
class RecipeBase:
    run_dir: Path = setting(Path("runs/run"), "where every stage's output, logs, plots and summary.json go")
    seed: int = setting(0, "seed for data order, model initialisation and sampling")
    model: ModelSection = setting(ModelSection, "the starting policy")
    data: DataSection = setting(DataSection, "training prompts (and demonstrations for SFT)")
    eval: list[EvalSpec] = setting([], "held-out sets and benchmarks, run before the first stage and after each")
    rollout: RolloutSection = setting(RolloutSection, "rollout workers of the stages that learn from rollouts")
    ray: RaySection = setting(RaySection, "the Ray cluster, for rollout.backend: ray")


@dataclass(frozen=True)
class StageEntry:
    name: str
    type: str


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Any:
    """Read, override and validate the recipe at `path`; returns the recipe dataclass instance, with
    `.stage_entries` (ordered stage names and types), `.source` (the file) and `.overrides` attached."""
    from rlpost.stages import STAGES

    raw = read_yaml(path)
    entries, flat = _stage_entries(raw, path, STAGES)
    cls = recipe_class(entries)
    for override in overrides:
        _check_stage_override(override, entries, STAGES)
    recipe = build_config(cls, flat, str(path), overrides)
    recipe.stage_entries, recipe.source, recipe.overrides = entries, str(path), list(overrides)
    check_relations(recipe)
    return recipe


def recipe_class(entries: list[StageEntry]) -> type:
    """A dataclass with the fixed sections plus one field per stage, typed by the stage's config."""
    from rlpost.stages import STAGES

    fields = [(e.name, STAGES[e.type].config, setting(STAGES[e.type].config, f"stage '{e.name}' ({e.type})"))
              for e in entries]
    return dataclasses.make_dataclass("Recipe", fields, bases=(RecipeBase,))


def recipe_help(path: str | Path) -> str:
    from rlpost.stages import STAGES

    entries, _ = _stage_entries(read_yaml(path), path, STAGES)
    return config_help(recipe_class(entries))


def flat_settings(recipe: Any) -> dict[str, Any]:
    """Every key of the recipe as 'dotted.key' -> value (JSON data), stages under their names."""
    out = _flatten(to_dict(recipe))
    out["stages"] = [f"{e.name}:{e.type}" for e in recipe.stage_entries]
    return out


def stage_defaults(recipe: Any) -> dict[str, Any]:
    """Each stage's keys at their defaults, flattened as `flat_settings` does ('<stage>.<key>' -> value)."""
    from rlpost.stages import STAGES

    return _flatten({e.name: to_dict(STAGES[e.type].config()) for e in recipe.stage_entries})


def section_defaults() -> dict[str, Any]:
    """The fixed sections' keys at their defaults, flattened as `flat_settings` does."""
    return _flatten(to_dict(RecipeBase()))


def _flatten(data: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and prefix not in _OPAQUE:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", data)
    return out


_OPAQUE = {"data.columns"}


def changed_keys(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ between two `flat_settings` documents (missing counts as different)."""
    keys = sorted(set(old) | set(new))
    return [k for k in keys if k not in ignore and old.get(k, "<absent>") != new.get(k, "<absent>")]


# ----------------------------------------------------------------------------- internals

def _stage_entries(raw: dict, path, stages: dict) -> tuple[list[StageEntry], dict]:
    """The ordered stage list, validated, and the recipe as a mapping with one key per stage."""
    listed = raw.get("stages")
    if not isinstance(listed, list) or not listed:
        raise UserError(f"{path}: key 'stages' must be a non-empty list, e.g. "
                        f"'stages: [{{type: sft}}, {{type: grpo}}]'")
    flat = {k: v for k, v in raw.items() if k != "stages"}
    entries: list[StageEntry] = []
    for i, stage in enumerate(listed):
        if not isinstance(stage, dict) or "type" not in stage:
            raise UserError(f"{path}: stages[{i}] must be a mapping with a 'type' "
                            f"(one of {', '.join(stages)}), got {stage!r}")
        kind = stage["type"]
        if kind not in stages:
            close = difflib.get_close_matches(str(kind), list(stages), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{path}: stages[{i}]: unknown stage type {kind!r}{hint}; "
                            f"known stages: {', '.join(stages)}")
        name = str(stage.get("name", kind))
        if name in FIXED_SECTIONS or name in {e.name for e in entries}:
            raise UserError(f"{path}: stages[{i}]: stage name {name!r} is taken; give it another 'name'")
        keys = {k: v for k, v in stage.items() if k not in ("type", "name")}
        _check_stage_keys(f"{path}: stages[{i}] ({name})", name, kind, keys, stages)
        entries.append(StageEntry(name, kind))
        flat[name] = keys
    return entries, flat


def _check_stage_keys(where: str, name: str, kind: str, keys: dict, stages: dict) -> None:
    """A key of another stage type gets a message saying which stage it belongs to."""
    own = {f.name for f in dataclasses.fields(stages[kind].config)}
    for key in keys:
        if key in own:
            continue
        owners = [t for t, s in stages.items() if t != kind and key in {f.name for f in dataclasses.fields(s.config)}]
        if owners:
            raise UserError(f"{where}: key '{key}' belongs to stage type '{owners[0]}', not '{kind}'; "
                            f"move it to that stage")


def _check_stage_override(override: str, entries: list[StageEntry], stages: dict) -> None:
    key = override.partition("=")[0].strip()
    head, _, rest = key.partition(".")
    entry = next((e for e in entries if e.name == head), None)
    if entry is not None and rest:
        _check_stage_keys(f"override '{override}'", entry.name, entry.type, {rest.split(".")[0]: None}, stages)


def where(recipe: Any, key: str) -> str:
    """The override that set `key` (or a section above it), else the recipe file: for messages."""
    for override in reversed(recipe.overrides):
        set_key = override.partition("=")[0].strip()
        if key == set_key or key.startswith(set_key + "."):
            return f"override '{override}'"
    return recipe.source


def check_relations(recipe: Any) -> None:
    """Range and relation checks across keys, one line each, before any work."""
    m = recipe.model
    if (m.path is None) == (m.build is None):
        raise UserError(f"{where(recipe, 'model')}: give exactly one of 'model.path' (a local model directory) or 'model.build' "
                        f"(the built-in tiny model); e.g. model.path=/models/my-model")
    if m.path is not None:
        p = Path(m.path).expanduser()
        if not (p / "config.json").is_file():
            what = "does not exist" if not p.exists() else "is not a model directory (no config.json)"
            raise UserError(f"{where(recipe, 'model.path')}: key 'model.path': {p} {what}; give a local directory that "
                            f"transformers' from_pretrained loads")
    r = recipe.rollout
    if r.workers < 1 or r.max_restarts < 0:
        key = "workers" if r.workers < 1 else "max_restarts"
        raise UserError(f"{where(recipe, f'rollout.{key}')}: key 'rollout.{key}' must be >= {1 if key == 'workers' else 0}, "
                        f"got {getattr(r, key)}")
    if recipe.ray.cpus_per_worker <= 0:
        raise UserError(f"{where(recipe, 'ray.cpus_per_worker')}: key 'ray.cpus_per_worker' must be > 0, "
                        f"got {recipe.ray.cpus_per_worker}")
    if m.threads < 1:
        raise UserError(f"{where(recipe, 'model.threads')}: key 'model.threads' must be >= 1, got {m.threads}")
    if m.learner_threads is not None and m.learner_threads < 1:
        raise UserError(f"{where(recipe, 'model.learner_threads')}: key 'model.learner_threads' must be >= 1 "
                        f"(or null: model.threads), got {m.learner_threads}")
    if not 0 < m.gpu_memory_utilization <= 1:
        raise UserError(f"{where(recipe, 'model.gpu_memory_utilization')}: key 'model.gpu_memory_utilization' must be in (0, 1], got {m.gpu_memory_utilization}")
    if recipe.data.source != "task" and m.build is not None:
        raise UserError(f"{where(recipe, 'data.source')}: the built-in character model (model.build) reads only the built-in task's "
                        f"prompts; use data.source=task or a model.path")
    if recipe.data.source == "task":
        _check_template_alphabet(recipe)
        _check_task(recipe)
    for i, spec in enumerate(recipe.eval):
        if spec.limit is not None and spec.limit < 1:
            raise UserError(f"{where(recipe, 'eval')}: key 'eval[{i}].limit' must be >= 1, got {spec.limit}")
        if spec.benchmark == "held_out" and recipe.data.source != "task":
            raise UserError(f"{where(recipe, 'eval')}: eval[{i}]: 'held_out' means the built-in task's held-out prompts; "
                            f"name a benchmark or a held-out dataset path for data.source={recipe.data.source!r}")
    from rlpost.stages import STAGES

    if recipe.data.source != "task":  # read the dataset now: a bad row stops here, before any work
        from rlpost.training_data import TrainingData

        TrainingData(recipe.data, recipe.seed).pool_size()
    from rlpost.lora import check_lora

    for entry in recipe.stage_entries:
        cfg, name = getattr(recipe, entry.name), entry.name

        def fail(key: str, message: str, name=name):
            raise UserError(f"{where(recipe, f'{name}.{key}')}: key '{name}.{key}' {message}")

        check_lora(getattr(cfg, "lora", None), fail)  # every stage's `lora` section (rlpost/lora.py)
        STAGES[entry.type].check(cfg, recipe, name)


def _template_text(recipe: Any) -> str:
    """What the prompt template adds around a row's columns (its literal text), for the built-in
    character tokenizer (one token a character, no chat template); "" for a model directory's own."""
    if recipe.model.build is None:
        return ""
    fmt = recipe.data.prompt
    return fmt.fill({column: "" for column in fmt.columns})


def _check_template_alphabet(recipe: Any) -> None:
    """The built-in tokenizer knows only ALPHABET: any other character of the template would reach the
    model as <unk>, silently."""
    from rlpost.modeling import ALPHABET

    unknown = sorted(set(_template_text(recipe)) - set(ALPHABET))
    if unknown:
        raise UserError(f"{where(recipe, 'data.prompt.template')}: key 'data.prompt.template' has characters the "
                        f"built-in model's tokenizer lacks ({''.join(unknown)!r}); it knows only {ALPHABET!r}")


def _check_task(recipe: Any) -> None:
    """The long-answer tasks (`data.task.digits`, `data.task.kind`): their keys, and budgets that fit the answer."""
    from rlpost.tasks import TASK_KINDS, build_task

    t = recipe.data.task
    if t.kind not in TASK_KINDS:
        raise UserError(f"{where(recipe, 'data.task.kind')}: key 'data.task.kind' must be one of "
                        f"{', '.join(TASK_KINDS)}, got {t.kind!r}")
    if t.digits is None:
        if t.kind == "counting":
            raise UserError(f"{where(recipe, 'data.task.digits')}: key 'data.task.digits' must be set for "
                            f"data.task.kind=counting (how many digits each number has, e.g. 21)")
        return
    if t.digits < 1:
        raise UserError(f"{where(recipe, 'data.task.digits')}: key 'data.task.digits' must be >= 1 (or null: "
                        f"operands in [0, max_operand]), got {t.digits}")
    if t.kind == "addition" and not 0 < t.carries <= t.digits:
        raise UserError(f"{where(recipe, 'data.task.carries')}: key 'data.task.carries' must be in "
                        f"(0, data.task.digits={t.digits}], got {t.carries}")
    if t.kind == "counting" and not t.reverse:
        raise UserError(f"{where(recipe, 'data.task.reverse')}: key 'data.task.reverse' must be true for "
                        f"data.task.kind=counting (its numbers are always written least significant digit first)")
    if t.kind == "counting" and not 1 <= t.numbers < 10 ** t.digits:
        raise UserError(f"{where(recipe, 'data.task.numbers')}: key 'data.task.numbers' must be in "
                        f"[1, 10**data.task.digits), got {t.numbers}")
    task = build_task(t.kind, t.max_operand, t.held_out_percent, t.reverse, t.carry_slip, t.digits, t.carries,
                      t.numbers)
    answer, prompt = task.answer_length, task.prompt_length + len(_template_text(recipe))
    shape = f"data.task.kind={t.kind}, data.task.digits={t.digits}"
    sequence = prompt + answer + 1  # budgets below must hold answer + EOS
    m = recipe.model
    limit = m.max_model_len or (m.build.max_positions if m.build else None)
    if limit and sequence > limit:
        key = "model.max_model_len" if m.max_model_len else "model.build.max_positions"
        raise UserError(f"{where(recipe, key)}: key '{key}' is {limit} but {shape} needs "
                        f"{sequence} positions (prompt {prompt}, answer {answer}, EOS); raise it")
    for i, spec in enumerate(recipe.eval):
        if spec.benchmark == "held_out" and (spec.max_tokens or 0) <= answer:
            shown = spec.max_tokens if spec.max_tokens else "unset (the addition default, 8)"
            raise UserError(f"{where(recipe, 'eval')}: key 'eval[{i}].max_tokens' is {shown} but the "
                            f"held-out answers have {answer} tokens and an EOS ({shape}); "
                            f"set it to at least {answer + 1}")
    for entry in recipe.stage_entries:
        cfg = getattr(recipe, entry.name)
        for key in ("max_tokens", "max_completion_length", "rollout_max_tokens"):
            budget = getattr(cfg, key, None)
            if isinstance(budget, int) and budget <= answer:
                raise UserError(f"{where(recipe, f'{entry.name}.{key}')}: key '{entry.name}.{key}' is {budget} "
                                f"but answers have {answer} tokens and an EOS ({shape}); "
                                f"set it to at least {answer + 1}")
