"""Checkpoints: a save -> load round trip restores weights, optimiser, RNG and counters; atomic writes; rotation."""

from __future__ import annotations

import random

import torch

from rlpost.checkpoint import RLState, latest_checkpoint, load_checkpoint, save_checkpoint


def trained_model_and_optimizer(make_tiny_model, seed: int):
    """A tiny model after two AdamW steps, so the optimiser carries moments and a step count."""
    model = make_tiny_model(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([[4, 5, 13, 6, 16, 9, 1]])
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def test_round_trip_restores_weights_optimizer_rng_and_counters(tmp_path, make_tiny_model, tokenizer):
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    state = RLState(step=7, samples_trained=896, next_prompt_index=61)
    random.seed(123)
    torch.manual_seed(456)
    path = save_checkpoint(tmp_path, model, tokenizer, optimizer, state)
    assert path == tmp_path / "checkpoints" / "step-000007"
    expected_draws = (torch.rand(3), random.random())

    other, other_opt = trained_model_and_optimizer(make_tiny_model, seed=1)  # different weights and moments
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    torch.manual_seed(0)
    random.seed(0)
    restored = load_checkpoint(path, other, other_opt)

    assert restored == state
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()  # still tied
    saved, loaded = optimizer.state_dict(), other_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for key, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, loaded["state"][key][name]), (key, name)
    draws = (torch.rand(3), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]


def test_latest_ignores_unfinished_writes_and_keeps_the_newest(tmp_path, make_tiny_model, tokenizer):
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=step), keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000020", "step-000030"]

    # a run killed while writing step 40 leaves a temporary directory; one killed before state.json
    # was written under the final name would leave an incomplete step directory: both are ignored
    (root / ".tmp-step-000040" / "policy").mkdir(parents=True)
    (root / ".tmp-step-000040" / "state.json").write_text('{"step": 40}')
    (root / "step-000050").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step-000030"
    # (rotation would count the incomplete step-000050 among the `keep` newest; remove it first)
    (root / "step-000050").rmdir()

    save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=40), keep=2)
    assert not (root / ".tmp-step-000040").exists()
    assert sorted(p.name for p in root.iterdir()) == ["step-000030", "step-000040"]
    assert latest_checkpoint(tmp_path) == root / "step-000040"
    assert load_checkpoint(root / "step-000040", model, optimizer).step == 40


def test_checkpoint_names_sort_numerically(tmp_path, make_tiny_model, tokenizer):
    """Zero-padded names sort like numbers: step 100 is newer than step 99."""
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    for step in (99, 100):
        save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=step), keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000100"]
    assert latest_checkpoint(tmp_path).name == "step-000100"


def test_an_incomplete_trainer_checkpoint_is_removed_and_the_previous_one_used(tmp_path):
    """transformers writes trainer_state.json last: a checkpoint folder without it was cut short by a kill."""
    from rlpost.checkpoint import last_trainer_checkpoint

    assert last_trainer_checkpoint(tmp_path / "absent") is None
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "model.safetensors").write_bytes(b"half")
    assert last_trainer_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    assert not (tmp_path / "checkpoint-10").exists()
