"""Reward models: the local builder, the batched scorer, the pooled reward function, the training recipe."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from recipes import train_reward_model as recipe
from rewards.reward_model import (ENV_VAR, RewardModelScorer, build_reward_model, make_reward_model_reward,
                                  reward_model_reward)
from rlpost.errors import UserError
from rlpost.modeling import ModelShape, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHAPE = ModelShape(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                   max_positions=64)
SIZES = {k: v for k, v in asdict(SHAPE).items() if k != "attention_dropout"}  # the reward model has none


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    """A saved, randomly initialised tiny reward model (its scores are arbitrary but fixed)."""
    tokenizer = build_tokenizer()
    model = build_reward_model(tokenizer, **SIZES, seed=3)
    directory = tmp_path_factory.mktemp("rm")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def head_on_last_token(model_dir: Path, text: str) -> float:
    """The score computed by hand: the head applied to the final hidden state of the unpadded text."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
        return float(model.score(hidden)[0])


def test_builder_makes_a_scalar_head_with_pad_id():
    tokenizer = build_tokenizer()
    model = build_reward_model(tokenizer, **SIZES, seed=0)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    logits = model(**tokenizer(["1+2=3", "4+5=9"], return_tensors="pt")).logits
    assert logits.shape == (2, 1)


def test_scorer_scores_last_real_token_and_is_padding_invariant(rm_dir):
    scorer = RewardModelScorer(rm_dir, batch_size=8)
    assert scorer.text("12+7=", "19") == "12+7=19<eos>"
    alone = scorer.score(["1+1="], ["2"])[0]
    longer = ["57+68=", "3+4=", "99+99=", "1+1="]
    batched = scorer.score(longer, ["125", "7", "198" * 5, "2"])
    assert alone == pytest.approx(batched[3], abs=1e-5)
    assert alone == pytest.approx(head_on_last_token(rm_dir, "1+1=2<eos>"), abs=1e-5)
    assert batched[0] == pytest.approx(head_on_last_token(rm_dir, "57+68=125<eos>"), abs=1e-5)
    assert len({round(s, 6) for s in batched}) == 4  # the scores depend on the text


def test_scorer_batches_and_truncates_from_the_left(rm_dir):
    texts = [f"{a}+{a}=" for a in range(10)]
    one_batch = RewardModelScorer(rm_dir, batch_size=64).score(texts, ["0"] * 10)
    small_batches = RewardModelScorer(rm_dir, batch_size=3).score(texts, ["0"] * 10)
    assert one_batch == pytest.approx(small_batches, abs=1e-5)
    short = RewardModelScorer(rm_dir, max_length=4)
    assert short.score(["123456+"], ["789"])[0] == pytest.approx(head_on_last_token(rm_dir, "789<eos>"), abs=1e-5)


def test_scorer_errors_are_user_errors(rm_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        RewardModelScorer(tmp_path / "missing")
    with pytest.raises(UserError, match="no config.json"):
        RewardModelScorer(tmp_path)
    with pytest.raises(UserError, match="chat template"):
        RewardModelScorer(rm_dir).score([[{"role": "user", "content": "1+1="}]], ["2"])


def test_chat_messages_are_scored_through_the_chat_template(rm_dir, tmp_path):
    from transformers import AutoTokenizer

    chat_dir = tmp_path / "chat"
    shutil.copytree(rm_dir, chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}<eos>"
    tokenizer.save_pretrained(chat_dir)
    scorer = RewardModelScorer(chat_dir)
    user = [{"role": "user", "content": "1+1="}]
    assert scorer.text(user, "2") == "1+1=2<eos>"
    chat = scorer.score([user, user], ["2", [{"role": "assistant", "content": "3"}]])
    assert chat == pytest.approx(RewardModelScorer(rm_dir).score(["1+1=", "1+1="], ["2", "3"]), abs=1e-6)
    with pytest.raises(UserError, match="mixes chat messages and plain text"):
        scorer.score([user, "1+1="], ["2", "2"])


def test_reward_function_reads_env_var_or_kwarg(rm_dir, monkeypatch):
    expected = RewardModelScorer(rm_dir).score(["3+4=", "3+4="], ["7", "8"])
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(UserError, match=ENV_VAR):
        reward_model_reward(["3+4="], ["7"])
    got = reward_model_reward(["3+4=", "3+4="], ["7", "8"], reward_model_dir=[str(rm_dir)] * 2)
    assert got == pytest.approx(expected, abs=1e-6)
    monkeypatch.setenv(ENV_VAR, str(rm_dir))
    assert reward_model_reward(["3+4=", "3+4="], ["7", "8"], [[1], [2]]) == pytest.approx(expected, abs=1e-6)
    assert make_reward_model_reward(rm_dir)(["3+4=", "3+4="], ["7", "8"]) == pytest.approx(expected, abs=1e-6)


def test_reward_model_through_the_pool_by_name(rm_dir):
    """Fresh interpreter: pool workers inherit the environment of the process that starts them."""
    expected = RewardModelScorer(rm_dir).score(["3+4=", "2+2=", "9+9="], ["7", "5", "18"])
    code = textwrap.dedent("""
        import json
        from rewards.pool import RewardPool
        from rewards.registry import RewardSpec
        with RewardPool([RewardSpec("reward_model", timeout_s=60)], workers=1, start_timeout_s=120) as pool:
            result = pool.score(["3+4=", "2+2=", "9+9="], ["7", "5", "18"])
            print(json.dumps({"values": result.per_function["reward_model"], "counts": pool.counts()}))
    """)
    env = {**os.environ, ENV_VAR: str(rm_dir), "RLPOST_REWARD_MODEL_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["values"] == pytest.approx(expected, abs=1e-5)
    counts = out["counts"]["reward_model"]
    assert counts.pop("calls") == 1 and not any(counts.values()), counts


@pytest.mark.parametrize("how", ["carry_error", "random", "wrong_operation"])
def test_wrong_sum_is_never_the_sum(how):
    rng = random.Random(0)
    assert all(recipe.wrong_sum(a, b, how, rng, 99) != a + b for a in range(100) for b in range(100))


def test_carry_error_flips_one_carry_by_hand():
    # 57+68=125: the carry out of the units (7+8=15) dropped -> 115; out of the tens (5+6+1=12) -> 25.
    # 12+34=46 has no carry: adding one out of the units -> 56, out of the tens -> 146.
    seen = {recipe.wrong_sum(57, 68, "carry_error", random.Random(s), 99) for s in range(20)}
    assert seen == {115, 25}
    assert {recipe.wrong_sum(12, 34, "carry_error", random.Random(s), 99) for s in range(20)} == {56, 146}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_pairs_bad_row_names_its_index(tmp_path):
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    with pytest.raises(UserError, match=r"row 2 needs string field 'rejected'"):
        recipe.read_pairs(write_jsonl(tmp_path / "a.jsonl", [good, good, {"prompt": "1+1=", "chosen": "2"}]))
    with pytest.raises(UserError, match=r"row 1 is not valid JSON"):
        recipe.read_pairs(write_jsonl(tmp_path / "b.jsonl", [good, "{oops"]))
    with pytest.raises(UserError, match=r"row 0 has chosen == rejected"):
        recipe.read_pairs(write_jsonl(tmp_path / "c.jsonl", [{**good, "rejected": "2"}]))
    with pytest.raises(UserError, match=r"row 0 needs string field 'chosen'"):
        recipe.read_pairs(write_jsonl(tmp_path / "d.jsonl", [{**good, "chosen": 2}]))


def test_jsonl_split_and_length_check(tmp_path):
    rows = [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i)} for i in range(20)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = recipe.load_config(recipe.RewardModelRecipe, None, [f"data={data}", "eval_fraction=0.25"])
    train, held = recipe.load_pairs(cfg, build_tokenizer(), 64)
    assert len(train) == 15 and len(held) == 5
    assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, rows))
    long = write_jsonl(tmp_path / "long.jsonl", rows[:3] + [{"prompt": "9" * 70, "chosen": "1", "rejected": "2"}])
    cfg = recipe.load_config(recipe.RewardModelRecipe, None, [f"data={long}"])
    with pytest.raises(UserError, match=r"long.jsonl: row 3 \('chosen'\) is 72 tokens, more than the model's 64"):
        recipe.load_pairs(cfg, build_tokenizer(), 64)
    with pytest.raises(UserError, match="eval_fraction must be in"):
        recipe.split_pairs(rows, 1.0, 0, data)


TINY_OVERRIDES = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
                  "model.intermediate_size=64"]


@pytest.mark.parametrize("start", ["fresh", "init_from_causal_lm", "jsonl_data"])
def test_train_reward_model_recipe_learns_held_out_pairs(start, tmp_path, capsys):
    """200 synthetic pairs, tiny model, 5 epochs (35 steps): held-out accuracy clearly above chance.

    Measured (seeds 0-4, fresh model): 0.915-0.955 on 200 held-out pairs, about 1.3 s of training.
    """
    overrides = list(TINY_OVERRIDES)
    if start == "init_from_causal_lm":  # e.g. the SFT policy: same backbone, a fresh scalar head
        from rlpost.modeling import build_model, save_pretrained

        tokenizer = build_tokenizer()
        save_pretrained(build_model(tokenizer, SHAPE, seed=0), tokenizer, tmp_path / "lm")
        overrides = [f"init_from={tmp_path / 'lm'}"]
    if start == "jsonl_data":  # the same pairs, read from local files
        cfg = recipe.load_config(recipe.RewardModelRecipe, None, [
            "synthetic.rejected=wrong_operation", "synthetic.train_pairs=200", "synthetic.held_out_pairs=200"])
        train, held = recipe.synthetic_pairs(cfg)
        overrides += [f"data={write_jsonl(tmp_path / 'train.jsonl', train)}",
                      f"eval_data={write_jsonl(tmp_path / 'held.jsonl', held)}"]
    metrics = recipe.main([
        f"output_dir={tmp_path / 'out'}", "synthetic.rejected=wrong_operation", "synthetic.train_pairs=200",
        "synthetic.held_out_pairs=200", "train.epochs=5", "train.threads=1", "train.logging_steps=1000",
        *overrides,
    ])
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy" in printed
    assert metrics["n"] == 200 and metrics["ci95"][0] > 0.5, printed
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"]
