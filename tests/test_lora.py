"""LoRA (rlpost/lora.py): merged weights, what a sync moves, and real runs (grpo with adapter-only and
merged sync, ppo) whose vLLM sampling logprobs match the learner's after every sync; the SFT stage
(as DPO's test in test_dpo_stage.py) trains a low-rank update. The online DPO and PRIME learners on
a LoRA policy: tests/test_online_dpo.py, tests/test_prime.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from rlpost import lora
from rlpost.lora import LoraSection
from rlpost.modeling import ModelShape, build_model, build_tokenizer
from rollouts.weight_sync import WeightPublisher, adapter_dir, base_name, exportable_state_dict
from tests.spine_helpers import NO_EVAL, copy_sft, quickstart_cmd, run, sft_only_recipe


def tiny_lora_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(build_tokenizer(), ModelShape(32, 1, 2, 1, 32, 32, 0.0), seed=seed)
    wrapped = lora.wrap(model, LoraSection(r=4, alpha=8.0))
    with torch.no_grad():  # B = 0 at init; give the adapters a value so merging matters
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return wrapped


def test_peft_key_names_map_to_the_base_model():
    assert base_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert base_name("base_model.model.lm_head.weight") == "lm_head.weight"


def test_merged_state_dict_is_w_plus_scaled_ba_and_leaves_the_model_untouched():
    """W' = W + (alpha / r) B A for each adapted layer, the same as peft's merge_and_unload, names
    those of the plain model; the trained model keeps its separate base and adapter weights."""
    model = tiny_lora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = exportable_state_dict(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    by_hand = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], by_hand, atol=1e-6)
    reference = model.merge_and_unload().state_dict()
    assert set(merged) == set(reference) - {"lm_head.weight"}  # tied head left out, as for any model
    for key, value in merged.items():
        assert torch.allclose(value, reference[key], atol=1e-6), key


def test_adapter_sync_moves_fewer_bytes_than_full(tmp_path, monkeypatch):
    monkeypatch.setattr("rollouts.weight_sync.shared_memory_base", lambda: tmp_path)
    model = tiny_lora_model()
    publisher = WeightPublisher("lora-test")
    try:
        full_dir, _ = publisher.publish(model, 1, form="full")
        full = publisher.last_bytes
        adapter, _ = publisher.publish(model, 2, form="adapter")
        small = publisher.last_bytes
        both, _ = publisher.publish(model, 3, form="both")
        assert (full_dir / "model.safetensors").exists() and not adapter_dir(full_dir).exists()
        assert (adapter_dir(adapter) / "adapter_model.safetensors").exists()
        assert not (adapter / "model.safetensors").exists()
        assert (both / "model.safetensors").exists() and (adapter_dir(both) / "adapter_config.json").exists()
        assert small < full / 2, (small, full)
    finally:
        publisher.close()


def test_checkpoint_round_trip_restores_the_adapter(tmp_path):
    from rlpost.checkpoint import RLState, load_checkpoint, save_checkpoint

    model = tiny_lora_model(seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(tmp_path, model, build_tokenizer(), opt, RLState(step=3))
    ckpt = next((tmp_path / "checkpoints").glob("step-*"))
    assert not (ckpt / "policy" / "model.safetensors").exists()  # the adapter only
    fresh = lora.wrap(build_model(build_tokenizer(), ModelShape(32, 1, 2, 1, 32, 32, 0.0), seed=1),
                      LoraSection(r=4, alpha=8.0))
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    assert load_checkpoint(ckpt, fresh, fresh_opt).step == 3
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_auto_sync_falls_back_to_merged_weights_where_the_engine_cannot_run_lora(monkeypatch):
    """`sync: auto` takes merged weights when vLLM refuses LoRA for the model; `sync: adapter` stops with an
    error that says what to set."""
    from types import SimpleNamespace

    import rollouts.engine
    from rollouts.worker import _start_engine

    class NoLoraEngine:
        def __init__(self, model_dir, settings, lora_rank=None):
            if lora_rank is not None:
                raise ValueError("Model Foo does not support LoRA")

    monkeypatch.setattr(rollouts.engine, "RolloutEngine", NoLoraEngine)
    spec = SimpleNamespace(model_dir="m", engine=None, lora_rank=8, lora_sync="auto")
    assert _start_engine(spec)[1] == "merged"
    with pytest.raises(RuntimeError, match="lora.sync to 'merged' or 'auto'"):
        _start_engine(SimpleNamespace(**{**vars(spec), "lora_sync": "adapter"}))
    assert _start_engine(SimpleNamespace(**{**vars(spec), "lora_rank": None}))[1] is None  # no LoRA


def test_bad_lora_key_names_it(tmp_path):
    result = run(quickstart_cmd(tmp_path, "grpo.lora={r: 0}"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "grpo.lora.r" in result.stderr and "must be >= 1" in result.stderr


# ----------------------------------------------------------------------------- real runs

STEPS = 3


def lora_cmd(run_dir: Path, stage_type: str, sync: str) -> list[str]:
    """STEPS synchronous steps of a rollout stage with LoRA and a length reward (every group has a spread,
    so every step moves the adapter), a large learning rate, and the vLLM/learner probe after every
    step's sync; the tiny quickstart model, its SFT stage reused, no evaluation (nothing here reads one)."""
    recipe = yaml.safe_load(sft_only_recipe(run_dir).read_text())
    recipe["stages"].append({
        "type": stage_type, "name": "rl", "max_steps": STEPS, "prompts_per_step": 4, "num_generations": 4,
        "reward_workers": 1, "max_staleness": 0, "eval_steps": 1, "save_steps": 2, "learning_rate": 0.02,
        "rewards": ["tests.reward_fixtures:length_reward"], "lora": {"r": 8, "alpha": 16, "sync": sync}})
    path = run_dir / "lora-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return quickstart_cmd(run_dir, NO_EVAL, recipe=path)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()]


def policy_logprobs(policy: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)


@pytest.mark.slow
@pytest.mark.parametrize("stage_type, sync", [("grpo", "adapter"), ("grpo", "merged"), ("ppo", "adapter")])
def test_lora_run_sampling_matches_learner_after_every_sync(sft_run, tmp_path, stage_type, sync):
    copy_sft(sft_run, tmp_path)
    result = run(lora_cmd(tmp_path, stage_type, sync))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "rl" / "stage.json").read_text())
    assert record["lora_sync"] == sync
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows if "sync/logprob_mismatch_max" in r] == list(range(1, STEPS + 1))
    assert max(r["sync/logprob_mismatch_max"] for r in rows if "sync/logprob_mismatch_max" in r) <= 1e-3
    assert all(r["train/grad_norm"] > 0 for r in rows if r["step"] > 0)
    # the parity means something: the adapters moved the policy well beyond the tolerance
    ids = [1, 5, 6, 7, 8]
    moved = policy_logprobs(tmp_path / "rl" / "policy", ids) - policy_logprobs(tmp_path / "sft" / "policy", ids)
    assert float(moved.abs().max()) > 1e-2
    assert (tmp_path / "rl" / "adapter" / "adapter_model.safetensors").exists()
    sizes = {r["sync/bytes"] for r in rows if "sync/bytes" in r}
    full = (tmp_path / "sft" / "policy" / "model.safetensors").stat().st_size
    assert all((s < full / 2) if sync == "adapter" else (s > full / 2) for s in sizes), (sizes, full)
    if (stage_type, sync) != ("grpo", "adapter"):
        return
    # resume: the checkpoints hold the adapter; without the last one (and the outputs) the same command
    # resumes from step 2 and redoes step 3, with no gap or repeat in the ledger
    stage = tmp_path / "rl"
    for path in (stage / "stage.json", tmp_path / "summary.json", stage / "checkpoints" / f"step-{STEPS:06d}"):
        assert path.exists(), path
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    again = run(lora_cmd(tmp_path, stage_type, sync))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "step-000002" in again.stderr
    ledger = [json.loads(line) for line in (stage / "ledger.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ledger] == list(range(1, STEPS + 1))
    assert [i for r in ledger for i in r["prompt_indices"]] == list(range(4 * STEPS))


def test_sft_stage_with_lora_writes_a_merged_low_rank_update(tmp_path):
    """The SFT stage (TRL's SFTTrainer, as the rejection stage's rounds use it) with `lora`: the merged
    policy differs from its input by a rank <= r matrix per adapted weight; the adapter is beside it."""
    from transformers import AutoModelForCausalLM

    result = run(quickstart_cmd(tmp_path, "sft.lora={r: 2}", "sft.learning_rate=0.01", NO_EVAL,
                                recipe=sft_only_recipe(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "sft" / "adapter" / "adapter_model.safetensors").exists()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "policy").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "initial" / "policy").state_dict()
    for key in ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert int(torch.linalg.matrix_rank(trained[key] - start[key], atol=1e-6)) in (1, 2), key
