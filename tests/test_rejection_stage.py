"""The rejection-sampling (expert iteration) stage: selection rule, recipe checks, and a real 2-round run.

The slow test runs the pipeline (`run_recipe`) on the quickstart's task and model with a short
SFT stage and then the rejection stage (2 rounds; vLLM sampling, the isolated reward pool, TRL's
SFTTrainer), and checks every kept row against the task's own checker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import rlpost.stages
from rlpost.errors import UserError
from rlpost.stages.rejection import RejectionStage, check_rejection, run_rejection, select_kept

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(rlpost.stages.STAGES, "rejection",
                        rlpost.stages.StageType(RejectionStage, run_rejection, check_rejection))


def write_recipe(directory: Path, sft: dict | None = None, rejection: dict | None = None, **top) -> Path:
    """recipes/quickstart.yaml's seed, model and data, no eval, stages [sft (if given), rejection]."""
    full = yaml.safe_load(QUICKSTART.read_text())
    recipe = {k: full[k] for k in ("seed", "model", "data")}
    recipe.update({"eval": [], **top})
    stages = [] if sft is None else [{"type": "sft", **sft}]
    recipe["stages"] = stages + [{"type": "rejection", **(rejection or {})}]
    path = Path(directory) / "rejection.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------- selection rule

def test_select_keeps_passing_distinct_texts_up_to_the_cap():
    texts = ["12", "12", "13", "14", "15", "x", "y", "y"]
    totals = [1.0, 1.0, 0.0, 1.0, 0.5, None, 1.0, 2.0]
    # prompt 1: "12", its duplicate skipped, "13" fails, "14"; prompt 2: 0.5 fails, None never,
    # "y" once (its duplicate, though scored higher, has the same text)
    assert select_kept(texts, totals, 4, threshold=1.0, keep_per_prompt=4) == [0, 3, 6]
    assert select_kept(texts, totals, 4, threshold=1.0, keep_per_prompt=1) == [0, 6]
    assert select_kept(texts, totals, 4, threshold=1.5, keep_per_prompt=4) == [7]
    assert select_kept(texts, totals, 4, threshold=0.5, keep_per_prompt=2) == [0, 3, 4, 6]
    assert select_kept(texts, totals, 8, threshold=-5.0, keep_per_prompt=3) == [0, 2, 3]
    assert select_kept(["a"] * 4, [None] * 4, 2, 0.0, 4) == []
    with pytest.raises(ValueError, match="do not form groups of 3"):
        select_kept(texts, totals, 3, 1.0, 1)


# ---------------------------------------------------------------------------------- recipe checks

def test_recipe_with_the_stage_loads(tmp_path, registered):
    from rlpost.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, rejection={"rounds": 2, "threshold": 0.5}), ["rejection.keep_per_prompt=1"])
    cfg = recipe.rejection
    assert (cfg.rounds, cfg.threshold, cfg.keep_per_prompt, cfg.num_generations) == (2, 0.5, 1, 8)
    assert cfg.rewards == ["arithmetic_exact"]


@pytest.mark.parametrize("override, message", [
    ("rejection.rounds=0", "'rejection.rounds' must be >= 1"),
    ("rejection.prompts_per_round=0", "'rejection.prompts_per_round' must be >= 1"),
    ("rejection.keep_per_prompt=0", "'rejection.keep_per_prompt' must be >= 1"),
    ("rejection.num_train_epochs=0", "'rejection.num_train_epochs' must be >= 1"),
    ("rejection.temperature=0", "'rejection.temperature' must be > 0"),
    ("rejection.learning_rate=0", "'rejection.learning_rate' must be > 0"),
    ("rejection.threshold=.nan", "'rejection.threshold' must be a finite number"),
    ("rejection.rewards=[no_such_reward]", "key 'rejection.rewards'"),
    ("rejection.prompts_per_round=100000", "the task has 8812 training prompts"),
    ("rejection.max_completion_length=64", "leaves no room for a prompt within max_model_len 64"),
])
def test_bad_settings_are_refused_naming_the_override(tmp_path, registered, override, message):
    from rlpost.recipe import load_recipe

    with pytest.raises(UserError, match="override '" + override.replace("[", r"\[").replace(".", r"\.")) as err:
        load_recipe(write_recipe(tmp_path), [override])
    assert message in str(err.value)


# ---------------------------------------------------------------------------------- a real run

ROUNDS, PROMPTS, GENERATIONS, KEEP = 2, 32, 8, 2


@pytest.mark.slow
def test_two_rounds_on_the_builtin_task(tmp_path, registered, monkeypatch):
    """Quickstart model and task; SFT: 2000 demonstrations x 10 epochs (it takes off at epoch ~9,
    ~20% greedy validation accuracy), then 2 rounds x 32 prompts x 8 samples; 40 held-out prompts
    evaluated at every point and in-stage before round 2. ~80 s on 2 cores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rollouts.engine
    from rewards.arithmetic import score_answer
    from rlpost.pipeline import run_recipe
    from rlpost.recipe import load_recipe
    from rlpost.stages import StageContext
    from rlpost.training_data import TrainingData

    run_dir = tmp_path / "run"
    sft = {"learning_rate": 1.0e-3, "per_device_train_batch_size": 64, "num_train_epochs": 10, "demonstrations": 2000,
           "validation_prompts": 50, "patience": 100, "max_tokens": 6}
    rejection = {"rounds": ROUNDS, "prompts_per_round": PROMPTS, "num_generations": GENERATIONS, "temperature": 0.8,
                 "keep_per_prompt": KEEP, "reward_workers": 1, "learning_rate": 1.0e-3,
                 "per_device_train_batch_size": 16, "num_train_epochs": 1}
    held_out = [{"benchmark": "held_out", "limit": 40}]
    recipe = load_recipe(write_recipe(tmp_path, sft, rejection, eval=held_out), [f"run_dir={run_dir}"])
    summary = run_recipe(recipe)
    record = json.loads((run_dir / "rejection" / "stage.json").read_text())
    assert summary["stages"]["rejection"]["kept"] == record["kept"]
    assert set(summary["evaluations"]["held_out"]["points"]) == {"initial", "sft", "rejection"}
    # round 2 starts with the in-stage evaluation of round 1's weights on its own engine; round 1's input
    # is the sft policy, which the pipeline evaluated
    assert "eval_before" not in record["rounds"][0] and record["rounds"][1]["eval_before"]["n"] == 40

    data = TrainingData(recipe.data, recipe.seed)
    stream = data.prompts()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft" / "policy")
    rounds = record["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    indices = []
    for r in rounds:
        n = r["round"]
        samples = [json.loads(line) for line in (run_dir / "rejection" / f"round-{n}" / "samples.jsonl").open()]
        start, stop = r["prompt_indices"]
        assert (start, stop) == ((n - 1) * PROMPTS, n * PROMPTS)
        assert sorted({s["prompt_index"] for s in samples}) == list(range(start, stop))
        indices.append(set(range(start, stop)))
        # counts add up
        kept = [s for s in samples if s["kept"]]
        assert r["samples"] == len(samples) == PROMPTS * GENERATIONS
        assert r["kept"] == len(kept) <= r["passed"] == sum(s["reward"] is not None and s["reward"] >= 1.0 for s in samples)
        assert r["fraction_kept"] == pytest.approx(len(kept) / len(samples))
        assert r["prompts_with_kept"] == len({s["prompt_index"] for s in kept})
        assert r["masked"] == 0 and r["trained"] == bool(kept)
        assert r["kept_completion_tokens"] == sum(len(tokenizer(s["completion"], add_special_tokens=False)["input_ids"]) + 1
                                                  for s in kept)
        assert r["sampled_tokens"] >= len(samples) and r["engine_startup_s"] > 0
        # every kept row is correct by the task's own checker, re-scored here, and the rule was followed
        for index in range(start, stop):
            answer = stream.get(index)[1]["answer"]
            group = [s for s in samples if s["prompt_index"] == index]
            assert all(s["reward"] == score_answer(s["completion"], answer) for s in group)
            mine = [s["completion"] for s in group if s["kept"]]
            assert all(score_answer(text, answer) == 1.0 for text in mine)
            assert len(mine) == len(set(mine)) <= KEEP
            correct = list(dict.fromkeys(s["completion"] for s in group if s["reward"] == 1.0))
            assert mine == correct[:KEEP]
    assert indices[0].isdisjoint(indices[1])
    assert record["samples"] == sum(r["samples"] for r in rounds) and record["kept"] == sum(r["kept"] for r in rounds)
    assert record["kept"] > 0, "no sample was kept: the SFT policy never answered correctly"
    assert record["fraction_kept"] == pytest.approx(record["kept"] / record["samples"])

    # the output policy loads, and is the last round's
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "rejection" / "policy")
    last = AutoModelForCausalLM.from_pretrained(run_dir / "rejection" / "round-2" / "policy")
    start_policy = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "policy")
    AutoTokenizer.from_pretrained(run_dir / "rejection" / "policy")
    same = [bool((a == b).all()) for a, b in zip(policy.state_dict().values(), last.state_dict().values())]
    assert all(same)
    moved = any(not bool((a == b).all()) for a, b in zip(policy.state_dict().values(), start_policy.state_dict().values()))
    assert moved == any(r["trained"] for r in rounds)
    assert not (run_dir / "rejection" / "round-1" / "trainer").exists()  # checkpoints dropped once a round is done

    # resume: a round killed after sampling trains on its saved samples without starting vLLM
    trained = next((r for r in reversed(rounds) if r["trained"]), None)
    if trained is not None:
        round_dir = run_dir / "rejection" / f"round-{trained['round']}"
        (round_dir / "round.json").unlink()
        before = (round_dir / "samples.jsonl").read_text()
        weights = AutoModelForCausalLM.from_pretrained(round_dir / "policy").state_dict()

        def no_engine(*args, **kwargs):
            raise AssertionError("a resumed round with saved samples must not start vLLM")

        monkeypatch.setattr(rollouts.engine, "RolloutEngine", no_engine)
        ctx = StageContext(recipe, "rejection", run_dir / "sft" / "policy", run_dir / "rejection", data, "cpu")
        again = run_rejection(recipe.rejection, ctx)
        assert (round_dir / "samples.jsonl").read_text() == before
        redo = again["rounds"][trained["round"] - 1]
        for key in ("samples", "kept", "passed", "kept_completion_tokens", "sft_tokens", "prompt_indices"):
            assert redo[key] == trained[key], key
        retrained = AutoModelForCausalLM.from_pretrained(round_dir / "policy").state_dict()
        assert all(torch.allclose(weights[k], retrained[k], atol=1e-6) for k in weights)  # same rows, same seed
