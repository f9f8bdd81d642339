"""Checkpoints: a save -> load round trip restores weights, optimiser, RNG and counters; atomic writes; rotation;
manifests (a damaged checkpoint is set aside, the previous one used); a full disk; nothing is unpickled on load."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess

import pytest
import torch

from rlpost.checkpoint import (CheckpointCorruptError, CheckpointWriteError, RLState, latest_checkpoint,
                               load_checkpoint, save_checkpoint, verify_checkpoint)
from rlpost.errors import UserError


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
    # (rotation leaves a directory that is not a checkpoint alone; remove it so the listing below is exact)
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


# --- manifests: what is verified, what happens to a damaged checkpoint ------------------------------

CKPT_LOG = "rlpost.checkpoint"


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path, make_tiny_model, tokenizer):
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    path = save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=3),
                           extra={"learner_extra.safetensors": {"v": torch.ones(3)}})
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    assert manifest["format"] == 2 and manifest["step"] == 3
    assert set(manifest["files"]) == set(on_disk) - {"manifest.json"}
    assert {"state.json", "optimizer.pt", "rng.json", "learner_extra.safetensors",
            "policy/model.safetensors", "policy/config.json"} <= set(manifest["files"])
    assert not (path / "rng.pt").exists()  # the RNG state is JSON, not a pickle
    for name, entry in manifest["files"].items():
        data = on_disk[name].read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert verify_checkpoint(path) is True


def _truncate(path):
    target = path / "policy" / "model.safetensors"
    target.write_bytes(target.read_bytes()[:-100])


def _flip_a_byte(path):
    target = path / "optimizer.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def _write_truncated_manifest(path):
    manifest = path / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])


DAMAGES = {  # how a checkpoint gets damaged -> words the warning must contain
    "file cut short": (_truncate, "policy/model.safetensors has"),
    "bytes flipped": (_flip_a_byte, "optimizer.pt does not match its sha256"),
    "file missing": (lambda p: (p / "policy" / "config.json").unlink(), "policy/config.json is missing"),
    "manifest missing": (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest unreadable": (_write_truncated_manifest, "manifest.json is unreadable"),
    "unlisted file": (lambda p: (p / "policy" / "pytorch_model.bin").write_bytes(b"\x80\x04."),
                      "policy/pytorch_model.bin is not in manifest.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(damage, tmp_path, make_tiny_model,
                                                                           tokenizer, caplog):
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    for step in (10, 20):
        save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=step), keep=2)
    root = tmp_path / "checkpoints"
    damage_fn, reason = DAMAGES[damage]
    damage_fn(root / "step-000020")

    with pytest.raises(CheckpointCorruptError, match=reason) as raised:  # named explicitly: refused, not loaded
        load_checkpoint(root / "step-000020", model, optimizer)
    assert isinstance(raised.value, UserError)
    with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
        assert latest_checkpoint(tmp_path) == root / "step-000010"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(root / "step-000020") in w and reason in w and "corrupt-step-000020" in w
               for w in warnings), warnings
    assert (root / "corrupt-step-000020").is_dir() and not (root / "step-000020").exists()
    assert load_checkpoint(root / "step-000010", model, optimizer).step == 10

    # the set-aside directory is neither picked nor removed by rotation
    for step in (20, 30):
        save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=step), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["corrupt-step-000020", "step-000020", "step-000030"]


def test_rotation_never_deletes_the_only_valid_checkpoint(tmp_path, make_tiny_model, tokenizer, caplog):
    """A damaged checkpoint is not counted among the `keep` newest: the good one before it stays."""
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=step), keep=2)
    _truncate(root / "step-000020")
    with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
        save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=30), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["corrupt-step-000020", "step-000010", "step-000030"]
    assert any("step-000020" in r.getMessage() and "cut short" in r.getMessage() for r in caplog.records)
    _flip_a_byte(root / "step-000030")  # (only the sha256 finds this: rotation's quick check does not hash)
    assert latest_checkpoint(tmp_path) == root / "step-000010"


def _to_the_old_layout(path, python_state, torch_state):
    """Make a checkpoint look like one written before manifests: rng.pt (torch.save'd dict), no manifest."""
    (path / "manifest.json").unlink()
    (path / "rng.json").unlink()
    torch.save({"torch": torch_state, "python": python_state}, path / "rng.pt")


def test_an_older_checkpoint_without_a_manifest_resumes_with_a_warning(tmp_path, make_tiny_model, tokenizer, caplog):
    """Run directories written before manifests keep resuming (their pickled rng.pt is read with
    weights_only=True); one whose state.json does not parse is set aside like a corrupt one."""
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    root = tmp_path / "checkpoints"
    random.seed(5)
    torch.manual_seed(6)
    old_states = (random.getstate(), torch.get_rng_state())
    expected_draws = (torch.rand(3), random.random())
    for step in (10, 20):
        _to_the_old_layout(save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=step)), *old_states)
    (root / "step-000020" / "state.json").write_text('{"step": 2')  # cut short

    with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
        assert latest_checkpoint(tmp_path) == root / "step-000010"
        assert verify_checkpoint(root / "step-000010") is False  # accepted, unverified
        random.seed(0)
        torch.manual_seed(0)
        assert load_checkpoint(root / "step-000010", model, optimizer).step == 10
    messages = [r.getMessage() for r in caplog.records]
    assert any("step-000020" in m and "state.json is unreadable" in m for m in messages), messages
    assert any("step-000010" in m and "no manifest.json" in m and "unverified" in m for m in messages), messages
    assert (root / "corrupt-step-000020").is_dir()
    draws = (torch.rand(3), random.random())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]


class _CreatesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_in_a_checkpoint_is_never_executed(tmp_path, make_tiny_model, tokenizer, caplog):
    """A run directory from elsewhere must not run code on resume: a malicious rng.pt (old layout) is
    ignored with a warning, a malicious optimizer.pt is refused; neither payload runs."""
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    root = tmp_path / "checkpoints"
    marker = tmp_path / "pwned"
    path = save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=10))
    _to_the_old_layout(path, random.getstate(), torch.get_rng_state())
    torch.save({"torch": _CreatesAFileWhenUnpickled(marker), "python": random.getstate()}, path / "rng.pt")

    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with caplog.at_level(logging.WARNING, logger=CKPT_LOG):
        assert latest_checkpoint(tmp_path) == path
        assert load_checkpoint(path, model, optimizer).step == 10
    assert not marker.exists(), "loading the checkpoint unpickled rng.pt and ran its code"
    assert any("not restoring the RNG state" in r.getMessage() and "not unpickled" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert torch.equal(torch.rand(3), expected)  # the RNG was left as it was

    torch.save({"state": {}, "param_groups": [_CreatesAFileWhenUnpickled(marker)]}, path / "optimizer.pt")
    with pytest.raises(CheckpointCorruptError, match="optimizer.pt holds objects other than tensors"):
        load_checkpoint(path, model, optimizer)
    assert not marker.exists(), "loading the checkpoint unpickled optimizer.pt and ran its code"

    torch.load(root / "step-000010" / "rng.pt", weights_only=False)  # the payload is live: unpickling runs it
    assert marker.exists()


# --- a full disk -----------------------------------------------------------------------------------


def _assert_full_disk_error(err: CheckpointWriteError, run_dir, step: int, intact_step: int | None):
    message = str(err)
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    assert isinstance(err, UserError) and err.step == step and err.path == final
    assert f"checkpoint step {step}" in message and str(final) in message, message
    assert "disk is full" in message or "quota is exceeded" in message, message
    assert "free space" in message.lower() and "rerun the same command" in message, message
    if intact_step is not None:
        assert f"Checkpoint step {intact_step} (" in message and "is intact" in message, message
        assert err.intact == run_dir / "checkpoints" / f"step-{intact_step:06d}"
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the partial checkpoint was left behind"


def test_a_full_disk_stops_with_a_clear_message_and_leaves_the_previous_checkpoint(tmp_path, make_tiny_model,
                                                                                   tokenizer):
    """On a real, small tmpfs: a checkpoint that fits, then one that cannot."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a 2 MB tmpfs (a real full filesystem)")
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to mount a 2 MB tmpfs")
    from rlpost.modeling import ModelShape, build_model

    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        run_dir = mnt / "run"
        small, small_opt = trained_model_and_optimizer(make_tiny_model, seed=0)
        first = save_checkpoint(run_dir, small, tokenizer, small_opt, RLState(step=1))  # ~75 kB: fits
        big = build_model(tokenizer, ModelShape(hidden_size=256, num_layers=1, num_heads=2, num_kv_heads=1,
                                                intermediate_size=1024))  # 4 MB of weights: does not
        with pytest.raises(CheckpointWriteError) as raised:
            save_checkpoint(run_dir, big, tokenizer, torch.optim.AdamW(big.parameters()), RLState(step=2))
        _assert_full_disk_error(raised.value, run_dir, step=2, intact_step=1)
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000001"]
        assert latest_checkpoint(run_dir) == first and verify_checkpoint(first) is True
        assert load_checkpoint(first, small, small_opt).step == 1
        assert shutil.disk_usage(mnt).free > 1_500_000  # the partial write was removed
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _raise(err):
    def fail(*args, **kwargs):
        raise err
    return fail


FULL_DISK_ERRORS = {
    "ENOSPC": ("tokenizer", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    "EDQUOT": ("tokenizer", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))),
    # what safetensors' Rust writer raises (no errno attribute, the OS error in the text)
    "safetensors": ("model", Exception("Error while serializing: I/O error: No space left on device (os error 28)")),
}


@pytest.mark.parametrize("kind", list(FULL_DISK_ERRORS))
def test_a_write_failing_for_lack_of_space_raises_checkpoint_write_error(kind, tmp_path, make_tiny_model, tokenizer,
                                                                         monkeypatch):
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    with monkeypatch.context() as patch:  # no checkpoint yet: the message says a rerun starts over
        patch.setattr(tokenizer, "save_pretrained", _raise(OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(CheckpointWriteError, match="No earlier checkpoint exists") as raised:
            save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=5))
        _assert_full_disk_error(raised.value, tmp_path, step=5, intact_step=None)
        assert raised.value.intact is None
    save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=10))
    target, err = FULL_DISK_ERRORS[kind]
    monkeypatch.setattr(tokenizer if target == "tokenizer" else model, "save_pretrained", _raise(err))
    with pytest.raises(CheckpointWriteError) as raised:
        save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=20))
    _assert_full_disk_error(raised.value, tmp_path, step=20, intact_step=10)
    assert ("quota" in str(raised.value)) == (kind == "EDQUOT")
    assert raised.value.__cause__ is err
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000010"


def test_another_write_error_propagates_unchanged_and_removes_the_partial_checkpoint(tmp_path, make_tiny_model,
                                                                                    tokenizer, monkeypatch):
    model, optimizer = trained_model_and_optimizer(make_tiny_model, seed=0)
    save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=10))
    monkeypatch.setattr(tokenizer, "save_pretrained", _raise(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):
        save_checkpoint(tmp_path, model, tokenizer, optimizer, RLState(step=20))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000010"]
