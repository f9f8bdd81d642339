"""The DPO stage: TRL's DPO losses checked by hand, the stage end to end on the addition task, and its
load-time errors for a bad pairs file.

TRL API used: `DPOTrainer.compute_loss`, `.data_collator`, `.log` / `.state.log_history` (public); the
stage overrides the private `DPOTrainer._prepare_dataset` to feed token ids, pinned by
`test_pretokenized_rows_equal_trls_own_tokenization` (TRL 1.16)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlpost.errors import UserError
from rlpost.prompting import PromptFormat
from rlpost.stages.dpo import DPOStage, build_dpo_trainer, check_dpo, run_dpo, tokenize_pair
from rlpost.tasks.arithmetic import AdditionTask, Problem


@pytest.fixture
def dpo_registered(monkeypatch):
    """The stage under `type: dpo` in `rlpost.stages.STAGES`, as rlpost.stages will register it."""
    import rlpost.stages as stages

    monkeypatch.setitem(stages.STAGES, "dpo", stages.StageType(DPOStage, run_dpo, check_dpo))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forward passes: one thread beats two contended ones on the shared cores
    yield
    torch.set_num_threads(threads)


def addition_pairs(count: int, seed: int) -> list[dict]:
    """Distinct training problems that need a carry: chosen the correct reversed sum, rejected the carry-less one."""
    task = AdditionTask(99, 12, True, 0.75)
    rows, rng = [], random.Random(f"pairs:{seed}")
    for a, b in rng.sample(task._train_pairs, len(task._train_pairs)):
        problem = Problem(a, b, True, task.width)
        careless = problem.written(slips=(True,) * 4)
        if careless != problem.answer:
            rows.append({"prompt": problem.prompt, "chosen": problem.answer, "rejected": careless})
        if len(rows) == count:
            return rows
    raise AssertionError("not enough carrying problems")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(tmp_path: Path, stage: dict, seed: int = 0) -> Path:
    recipe = {
        "run_dir": str(tmp_path / "run"), "seed": seed,
        "model": {"build": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                            "intermediate_size": 128, "max_positions": 32}, "device": "cpu"},
        "data": {"source": "task"},
        "stages": [{"type": "dpo", **stage}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


# ----------------------------------------------------------------------------- (1) the losses, by hand


def completion_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log pi(completion | prompt): one unpadded forward, the completion tokens' log-probs summed."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
    return sum(logps[p, ids[0, p + 1]] for p in positions)


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.5)])
def test_trl_dpo_losses_equal_the_hand_computed_formulas(loss_type, beta, tokenizer, make_tiny_model, tmp_path):
    policy, reference = make_tiny_model(0), make_tiny_model(1)  # different weights: non-zero log-ratios
    fmt = PromptFormat()
    raw = [{"prompt": "12+34=", "chosen": "64", "rejected": "65"},
           {"prompt": "7+8=", "chosen": "5", "rejected": "123"},  # unequal lengths: IPO's per-token normalisation
           {"prompt": "99+1=", "chosen": "001", "rejected": "0"}]
    rows = [tokenize_pair(tokenizer, fmt, r) for r in raw]
    assert rows[1]["chosen_ids"] == tokenizer("5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    with torch.no_grad():
        h, h_norm = [], []
        for r in rows:
            lc, lr = (completion_logp(policy, r["prompt_ids"], r[k]) for k in ("chosen_ids", "rejected_ids"))
            rc, rr = (completion_logp(reference, r["prompt_ids"], r[k]) for k in ("chosen_ids", "rejected_ids"))
            h.append((lc - rc) - (lr - rr))
            h_norm.append((lc - rc) / len(r["chosen_ids"]) - (lr - rr) / len(r["rejected_ids"]))
        h, h_norm = torch.stack(h), torch.stack(h_norm)
    assert h.abs().min() > 1e-3  # a real test: the margins are not all zero
    if loss_type == "sigmoid":
        expected = (-F.logsigmoid(beta * h)).mean()  # -log sigmoid(beta * ((lc - rc) - (lr - rr)))
    else:
        expected = ((h_norm - 1 / (2 * beta)) ** 2).mean()  # IPO, TRL's per-token log-ratios: (h - 1/(2 tau))^2

    cfg = DPOStage(pairs="unused", loss_type=loss_type, beta=beta, max_length=None)
    trainer = build_dpo_trainer(policy, reference, tokenizer, rows, cfg, out_dir=tmp_path / loss_type)
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert float(loss) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)

    trainer.log({})  # TRL's public log merges its batch metrics into the log history
    logged = trainer.state.log_history[-1]
    assert logged["rewards/margins"] == pytest.approx(float((beta * h).mean()), rel=1e-4, abs=1e-6)
    assert logged["rewards/accuracies"] == pytest.approx(float((h > 0).float().mean()))


def test_pretokenized_rows_equal_trls_own_tokenization(tokenizer, make_tiny_model, tmp_path):
    """Pins the private override: for the character tokenizer, where TRL's text path and the recipe's
    PromptFormat agree, the rows handed to TRL equal what its own `_prepare_dataset` makes of the text."""
    import inspect

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    assert list(inspect.signature(DPOTrainer._prepare_dataset).parameters) == [
        "self", "dataset", "processing_class", "args", "dataset_name"]
    raw = addition_pairs(4, 0)
    text = DPOTrainer(model=make_tiny_model(0), ref_model=make_tiny_model(0), train_dataset=Dataset.from_list(raw),
                      processing_class=tokenizer,
                      args=DPOConfig(output_dir=str(tmp_path / "text"), report_to=[], use_cpu=True, bf16=False,
                                     gradient_checkpointing=False))
    ours = [tokenize_pair(tokenizer, PromptFormat(), r) for r in raw]
    trainer = build_dpo_trainer(make_tiny_model(0), make_tiny_model(0), tokenizer, ours, DPOStage(pairs="unused"),
                                out_dir=tmp_path / "ours")
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    assert [{c: r[c] for c in columns} for r in text.train_dataset] == [
        {c: r[c] for c in columns} for r in trainer.train_dataset]


# ----------------------------------------------------------------------------- (2) end to end


def run_stage(tmp_path: Path, seed: int, **keys) -> tuple[dict, object]:
    """The stage on 600 addition pairs (200 held out), loaded from a recipe and run as the pipeline runs it."""
    from rlpost.pipeline import initial_policy
    from rlpost.recipe import load_recipe
    from rlpost.stages import STAGES, StageContext
    from rlpost.training_data import TrainingData

    tmp_path.mkdir(parents=True, exist_ok=True)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(600, seed))
    recipe = load_recipe(write_recipe(tmp_path, {"pairs": str(pairs), "held_out_pairs": 200,
                                                 "num_train_epochs": 3, **keys}, seed))
    policy_in = initial_policy(recipe, Path(recipe.run_dir))
    ctx = StageContext(recipe, "dpo", policy_in, Path(recipe.run_dir) / "dpo", TrainingData(recipe.data, seed), "cpu")
    return STAGES["dpo"].run(recipe.dpo, ctx), ctx


@pytest.mark.parametrize("seed", [0, 1])
def test_dpo_stage_teaches_the_policy_to_prefer_correct_sums(seed, tmp_path, dpo_registered, one_thread):
    from transformers import AutoModelForCausalLM

    record, ctx = run_stage(tmp_path, seed)
    cfg = ctx.recipe.dpo
    assert (cfg.loss_type, cfg.beta, cfg.learning_rate) == ("sigmoid", 0.1, 1e-4)  # the defaults
    assert (record["pairs"], record["pairs_trained"], record["held_out_pairs"]) == (600, 400, 200)
    before, after = record["held_out_accuracy_before"], record["held_out_accuracy_after"]
    assert after >= before + 0.2 and after >= 0.7, record  # measured: 0.37 -> 0.85 (seed 0), 0.50 -> 0.84 (seed 1)
    assert record["held_out_reward_accuracy"] > 0.7
    assert record["rewards/margins"] > 0 and record["rewards/accuracies"] > 0.5
    assert record["rewards/chosen"] > record["rewards/rejected"]
    assert math.isfinite(record["final_train_loss"]) and record["final_train_loss"] < math.log(2)
    assert record["steps"] == 3 * math.ceil(400 / 32)
    trained = AutoModelForCausalLM.from_pretrained(ctx.out_dir / "policy")  # model + tokenizer written
    assert (ctx.out_dir / "policy" / "tokenizer.json").exists()
    start = AutoModelForCausalLM.from_pretrained(ctx.policy_in)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))


def test_precomputed_reference_log_probs_train_the_same_policy(tmp_path, dpo_registered, one_thread):
    """With precompute_ref_log_probs TRL drops the second model copy; the reference (the starting policy) and so
    the whole stage are unchanged."""
    kept, _ = run_stage(tmp_path / "kept", 0)
    precomputed, _ = run_stage(tmp_path / "precomputed", 0, precompute_ref_log_probs=True)
    for key in ("held_out_accuracy_before", "held_out_accuracy_after", "held_out_reward_accuracy", "final_train_loss",
                "rewards/margins"):
        assert precomputed[key] == pytest.approx(kept[key], rel=1e-4), key


# ----------------------------------------------------------------------------- (3) load-time errors


def load_error(tmp_path, stage: dict) -> str:
    from rlpost.recipe import load_recipe

    with pytest.raises(UserError) as err:
        load_recipe(write_recipe(tmp_path, stage))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("rows,stage,expected", [
    ([{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "2+2=", "chosen": "4"}],
     {}, ["row 1", "'rejected'"]),
    ([{"prompt": "1+2=", "chosen": "3", "rejected": "4"}, {"prompt": "2+2=", "chosen": 4, "rejected": "5"}],
     {}, ["row 1", "'chosen'", "holds int"]),
    ([{"prompt": "1+2=", "good": "3", "bad": "4"}, {"prompt": "2+2=", "good": "4", "worse": "5"}],
     {"columns": {"chosen": "good", "rejected": "bad"}}, ["row 1", "'bad'"]),
    ([{"question": "1+2=", "chosen": "3", "rejected": "4"}], {}, ["row 0", "prompt column 'prompt'"]),
])
def test_a_bad_pairs_file_is_a_one_line_error_naming_row_and_column(rows, stage, expected, tmp_path, dpo_registered):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    message = load_error(tmp_path, {"pairs": str(path), "held_out_pairs": 0, **stage})
    assert "dpo.pairs" in message and str(path) in message
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("stage,expected", [
    ({"beta": 0}, "'dpo.beta' must be > 0"),
    ({"per_device_train_batch_size": 0}, "'dpo.per_device_train_batch_size' must be >= 1"),
    ({"num_train_epochs": 0}, "'dpo.num_train_epochs' must be >= 1"),
    ({"loss_type": "kto"}, "loss_type"),
    ({"loss_type": "exo_pair"}, "label_smoothing"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "[0, 0.5)"),
    ({"held_out_pairs": 3}, "leaves none of the 3 pairs"),
    ({"pairs": None}, "needs key 'dpo.pairs'"),
    ({"pairs": "missing.jsonl"}, "does not exist"),
])
def test_bad_dpo_keys_are_one_line_errors(stage, expected, tmp_path, dpo_registered):
    path = write_jsonl(tmp_path / "pairs.jsonl", addition_pairs(3, 0))
    message = load_error(tmp_path, {"pairs": str(path), "held_out_pairs": 1, **stage})
    assert expected in message, message


def test_pairs_from_rollouts_take_the_best_and_worst_verified_sample():
    from rlpost.stages.dpo import best_and_worst

    assert best_and_worst([0.0, 1.0, None, 1.0, 0.0], ["a", "b", "c", "d", "e"]) == ((1.0, "b"), (0.0, "a"))
    assert best_and_worst([1.0, 1.0], ["a", "b"]) is None  # no preference without a reward difference
    assert best_and_worst([None, 0.0, None], ["a", "b", "c"]) is None  # a masked sample is never a side
    assert best_and_worst([None, None], ["a", "b"]) is None
    assert best_and_worst([0.5, -1.0, 2.0], ["a", "b", "c"]) == ((2.0, "c"), (-1.0, "b"))


def test_tulu3_recipe_loads_and_checks_its_rollout_keys():
    from rlpost.errors import UserError
    from rlpost.recipe import load_recipe

    tulu3 = Path(__file__).resolve().parents[1] / "recipes" / "tulu3.yaml"
    recipe = load_recipe(tulu3)
    assert [(e.name, e.type) for e in recipe.stage_entries] == [("sft", "sft"), ("dpo", "dpo"), ("grpo", "grpo")]
    assert recipe.dpo.pairs == "rollouts"
    with pytest.raises(UserError, match="override 'dpo.rollout_samples=1'.*rollout_samples"):
        load_recipe(tulu3, ["dpo.rollout_samples=1"])
    with pytest.raises(UserError, match="dpo.rollout_temperature"):
        load_recipe(tulu3, ["dpo.rollout_temperature=0"])


def test_dpo_with_lora_trains_a_low_rank_update(tmp_path, dpo_registered, one_thread):
    """`lora: {r: 4}`: TRL's DPOTrainer trains peft adapters; the stage writes the merged policy (an ordinary
    model directory) and the adapter; each adapted weight moved by a matrix of rank <= 4, and the policy
    still learns the preference."""
    from transformers import AutoModelForCausalLM

    record, ctx = run_stage(tmp_path, 0, lora={"r": 4, "alpha": 32}, learning_rate=2e-3)
    assert record["held_out_accuracy_after"] >= record["held_out_accuracy_before"] + 0.2, record
    assert (ctx.out_dir / "adapter" / "adapter_model.safetensors").exists()
    trained = AutoModelForCausalLM.from_pretrained(ctx.out_dir / "policy").state_dict()
    start = AutoModelForCausalLM.from_pretrained(ctx.policy_in).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert int(torch.linalg.matrix_rank(trained[q] - start[q], atol=1e-6)) in range(1, 5)
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # not adapted
