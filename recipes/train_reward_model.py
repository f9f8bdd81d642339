"""Train a reward model on preference pairs with TRL's RewardTrainer; report held-out pairwise accuracy.

Run it with `python -m recipes.train_reward_model [recipe.yaml] [key=value ...]`.

Data: rows `{prompt, chosen, rejected}`. By default they are synthetic pairs for the addition task
(`rlpost/tasks/arithmetic.py`): `chosen` is the correct written sum, `rejected` a wrong one, made
by `synthetic.rejected`:

    carry_error      the sum with the carry out of one column flipped (dropped where there was a
                     carry, added where there was none): s -/+ 10^(k+1), the careless
                     demonstrator's kind of mistake. Measured on 500 held-out pairs (2-core
                     CPU, one thread): 4000 pairs x 5 epochs 0.734 (43 s of training),
                     x 10 epochs 0.836 (64 s), x 20 epochs 0.996; the default 8000 x 10: 1.000
                     (111 s)
    random           a uniformly random wrong number in [0, 2 * max_operand]
    wrong_operation  the product a * b instead of the sum (a + b + 1 where they coincide); easy

Training pairs come from the task's training problems, held-out pairs from its held-out problems
(operand pairs never used in training). With `data: pairs.jsonl` the pairs are read from a local
JSONL file instead (one object per line with string fields prompt, chosen, rejected); held-out
pairs are `eval_data` if given, else the last `eval_fraction` of the rows after a seeded shuffle.

Model: a Qwen2 sequence classifier (`num_labels=1`) built locally with the character tokenizer,
or, with `init_from`, a local model directory (e.g. the SFT policy) with a fresh scalar head.
Loss (TRL's): -log sigma(r(x, chosen) - r(x, rejected)), averaged over the batch.

Evaluation: the saved model is loaded back with `RewardModelScorer` (the scorer the reward
function uses); pairwise accuracy = fraction of held-out pairs with r(chosen) > r(rejected)
(ties count as errors), with a 95% Wilson interval.
Outputs in `output_dir`: `model/` (the reward model; set RLPOST_REWARD_MODEL to it) and `metrics.json`.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlpost.config import load_config, setting, to_dict
from rlpost.errors import UserError

DEFAULT_RECIPE = Path(__file__).with_name("train_reward_model.yaml")
PAIR_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class ModelSection:
    hidden_size: int = setting(64, "width of the Qwen2 reward model")
    num_layers: int = setting(2, "transformer layers")
    num_heads: int = setting(4, "attention heads")
    num_kv_heads: int = setting(2, "key/value heads (grouped-query attention)")
    intermediate_size: int = setting(128, "MLP width")
    max_positions: int = setting(64, "longest prompt + answer + EOS in tokens")


@dataclass
class SyntheticSection:
    train_pairs: int = setting(8000, "training pairs drawn from the task's training problems")
    held_out_pairs: int = setting(500, "evaluation pairs on distinct held-out problems")
    max_operand: int = setting(99, "operands are integers in [0, max_operand]")
    held_out_percent: int = setting(15, "percent of all operand pairs reserved for evaluation only")
    reverse: bool = setting(False, "write sums least-significant digit first (the quickstart does not)")
    rejected: str = setting("carry_error", "how the wrong sum is made",
                            choices=("carry_error", "random", "wrong_operation"))


@dataclass
class TrainSection:
    learning_rate: float = setting(1e-3, "AdamW learning rate, constant")
    batch_size: int = setting(32, "pairs per step")
    epochs: float = setting(10.0, "passes over the training pairs")
    center_rewards_coefficient: float | None = setting(None, "weight of TRL's mean(r^2) penalty (None: off)")
    logging_steps: int = setting(50, "log loss and batch accuracy every N steps")
    threads: int = setting(1, "torch CPU threads (tiny models: one thread beats two contended ones)")


@dataclass
class RewardModelRecipe:
    output_dir: Path = setting(Path("runs/reward_model"), "where model/ and metrics.json go")
    seed: int = setting(0, "seed for data, model initialisation and batching")
    data: Path | None = setting(None, "local JSONL preference pairs (None: synthetic addition pairs)",
                                path_must_exist=True)
    eval_data: Path | None = setting(None, "local JSONL held-out pairs (None: split them off data)",
                                     path_must_exist=True)
    eval_fraction: float = setting(0.1, "fraction of data held out when eval_data is not given")
    init_from: Path | None = setting(None, "local model directory to start from (None: build one)",
                                     path_must_exist=True)
    model: ModelSection = setting(ModelSection, "shape of the locally built reward model")
    synthetic: SyntheticSection = setting(SyntheticSection, "the built-in addition-task pairs")
    train: TrainSection = setting(TrainSection, "RewardTrainer settings")


# ----------------------------------------------------------------------------- data

def wrong_sum(a: int, b: int, how: str, rng: random.Random, max_operand: int) -> int:
    """A number that is not a + b, made as `how` says (see the module docstring)."""
    s = a + b
    if how == "carry_error":
        k = rng.randrange(len(str(max(a, b))))  # a column that has digits of the operands
        carries = (a % 10 ** (k + 1) + b % 10 ** (k + 1)) >= 10 ** (k + 1)
        return s - 10 ** (k + 1) if carries else s + 10 ** (k + 1)
    if how == "random":
        w = rng.randint(0, 2 * max_operand - 1)
        return w + 1 if w >= s else w  # uniform over [0, 2 * max_operand] without s
    return a * b if a * b != s else s + 1


def synthetic_pairs(cfg: RewardModelRecipe) -> tuple[list[dict], list[dict]]:
    """(train, held-out) addition pairs; held-out problems are never training problems."""
    from rlpost.tasks.arithmetic import AdditionTask, written_sum

    s = cfg.synthetic
    task = AdditionTask(s.max_operand, s.held_out_percent, s.reverse)
    rng = random.Random(f"reward-pairs:{cfg.seed}")

    def pair(problem) -> dict:
        wrong = wrong_sum(problem.a, problem.b, s.rejected, rng, s.max_operand)
        return {"prompt": problem.prompt, "chosen": problem.answer, "rejected": written_sum(wrong, 0, s.reverse)}

    train = [pair(task.train_problem(cfg.seed, i)) for i in range(s.train_pairs)]
    try:
        held = [pair(p) for p in task.held_out(s.held_out_pairs, cfg.seed)]
    except ValueError as exc:
        raise UserError(f"synthetic.held_out_pairs: {exc}; lower it or raise held_out_percent") from None
    return train, held


def read_pairs(path: Path) -> list[dict]:
    """Rows of a JSONL file of preference pairs; UserError naming the row index of a bad row."""
    rows = []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for index, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: row {index} is not valid JSON ({exc.msg}); "
                            f"write one JSON object per line") from None
        bad = [k for k in PAIR_KEYS if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if bad:
            raise UserError(f"{path}: row {index} needs string field '{bad[0]}'; "
                            f"each row must have string fields {', '.join(PAIR_KEYS)}")
        if row["chosen"] == row["rejected"]:
            raise UserError(f"{path}: row {index} has chosen == rejected; drop it or fix it")
        rows.append({k: row[k] for k in PAIR_KEYS})
    if not rows:
        raise UserError(f"{path}: no preference pairs; write one JSON object per line")
    return rows


def split_pairs(rows: list[dict], eval_fraction: float, seed: int, source: Path) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the last `eval_fraction` of the rows after a seeded shuffle is held out."""
    if not 0 < eval_fraction < 1:
        raise UserError(f"eval_fraction must be in (0, 1), got {eval_fraction}; or give eval_data")
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_eval = max(1, round(eval_fraction * len(rows)))
    if n_eval >= len(rows):
        raise UserError(f"{source}: {len(rows)} rows leave nothing to train on after holding out "
                        f"{n_eval}; add rows or give eval_data")
    return rows[:-n_eval], rows[-n_eval:]


def check_lengths(pairs: list[dict], tokenizer, max_positions: int, source: str) -> None:
    """Every prompt + answer + EOS must fit the model (TRL would drop longer rows silently)."""
    for index, row in enumerate(pairs):
        for key in ("chosen", "rejected"):
            n = len(tokenizer(row["prompt"] + row[key] + tokenizer.eos_token)["input_ids"])
            if n > max_positions:
                raise UserError(f"{source}: row {index} ('{key}') is {n} tokens, more than the model's "
                                f"{max_positions}; shorten it or raise model.max_positions")


def load_pairs(cfg: RewardModelRecipe, tokenizer, max_positions: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs: synthetic, or from `data` (+ `eval_data`), each row checked for length."""
    if cfg.data is None:
        train, held = synthetic_pairs(cfg)
        sources = [(train, "synthetic train pairs"), (held, "synthetic held-out pairs")]
    else:
        rows = read_pairs(cfg.data)
        check_lengths(rows, tokenizer, max_positions, str(cfg.data))  # row indices as in the file
        if cfg.eval_data is None:
            return split_pairs(rows, cfg.eval_fraction, cfg.seed, cfg.data)
        train, held = rows, read_pairs(cfg.eval_data)
        sources = [(held, str(cfg.eval_data))]
    for pairs, source in sources:
        check_lengths(pairs, tokenizer, max_positions, source)
    return train, held


# ----------------------------------------------------------------------------- model and training

def build_model_and_tokenizer(cfg: RewardModelRecipe):
    """A fresh local reward model, or `init_from` with a new scalar head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rewards.reward_model import build_reward_model
    from rlpost.modeling import build_tokenizer

    if cfg.init_from is not None:
        tokenizer = AutoTokenizer.from_pretrained(cfg.init_from)
        model = AutoModelForSequenceClassification.from_pretrained(cfg.init_from, num_labels=1)
        return model, tokenizer
    m = cfg.model
    tokenizer = build_tokenizer()
    model = build_reward_model(tokenizer, hidden_size=m.hidden_size, num_layers=m.num_layers,
                               num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                               intermediate_size=m.intermediate_size, max_positions=m.max_positions,
                               seed=cfg.seed)
    return model, tokenizer


def train_model(cfg: RewardModelRecipe, model, tokenizer, train: list[dict], out_dir: Path) -> float:
    """Run RewardTrainer on `train`; save model and tokenizer to `out_dir`; return seconds taken."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    t = cfg.train
    args = RewardConfig(
        output_dir=str(out_dir.parent / "trainer"),
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        lr_scheduler_type="constant",
        num_train_epochs=t.epochs,
        center_rewards_coefficient=t.center_rewards_coefficient,
        max_length=None,  # lengths are checked up front instead of rows being dropped
        logging_steps=t.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        dataloader_num_workers=0,
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16 autocast, which is ~10x slower on CPUs without AMX
    )
    start = time.perf_counter()
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train),
                            processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(out_dir))
    return time.perf_counter() - start


def pairwise_accuracy(model_dir: Path, pairs: list[dict]) -> dict:
    """Held-out accuracy of r(chosen) > r(rejected) with its 95% Wilson interval."""
    from rewards.reward_model import RewardModelScorer
    from rlpost.evaluation.metrics import wilson_interval

    scorer = RewardModelScorer(model_dir)
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer.score(prompts, [p["chosen"] for p in pairs])
    rejected = scorer.score(prompts, [p["rejected"] for p in pairs])
    wins = sum(c > r for c, r in zip(chosen, rejected))
    low, high = wilson_interval(wins, len(pairs))
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)
    return {"accuracy": wins / len(pairs), "ci95": [low, high], "n": len(pairs), "mean_margin": margin}


def main(argv: list[str] | None = None) -> dict:
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = Path(argv.pop(0)) if argv and "=" not in argv[0] else DEFAULT_RECIPE
    cfg = load_config(RewardModelRecipe, recipe, argv)
    torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = build_model_and_tokenizer(cfg)
    train, held = load_pairs(cfg, tokenizer, model.config.max_position_embeddings)

    train_s = train_model(cfg, model, tokenizer, train, out / "model")
    metrics = {"train_pairs": len(train), "train_s": train_s, **pairwise_accuracy(out / "model", held),
               "config": to_dict(cfg)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    low, high = metrics["ci95"]
    print(f"held-out pairwise accuracy {metrics['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}, "
          f"n={metrics['n']}) after {len(train)} training pairs in {train_s:.1f} s")
    print(f"reward model: {out / 'model'}  (RLPOST_REWARD_MODEL={out / 'model'})")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(UserError.exit_code)
