"""SFT killed mid-stage resumes from its last epoch checkpoint with the same stopping state:
no epoch is lost or repeated, and the weights equal those of an uninterrupted run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from rlpost.modeling import ModelShape, build_model, build_tokenizer
from rlpost.prompting import PromptFormat
from rlpost.sft import run_sft
from rlpost.stages.sft import _tokenize
from rlpost.tasks.arithmetic import AdditionTask

SHAPE = ModelShape(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
CFG = SimpleNamespace(learning_rate=1e-3, per_device_train_batch_size=16, num_train_epochs=4, warmup_steps=0,
                      lr_scheduler_type="constant_with_warmup", eval_every_epochs=1, patience=10)


class Killed(Exception):
    pass


class KillAfterSave(TrainerCallback):
    """Raises right after the checkpoint of epoch `epoch` is written (as a SIGKILL then would leave it)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_save(self, args, state, control, **kwargs):
        if round(state.epoch) == self.epoch:
            raise Killed


def scripted_validation():
    """A validation whose value depends only on the epoch it is asked at (so reruns agree)."""
    values = {1: 0.1, 2: 0.3, 3: 0.2, 4: 0.25}
    calls = []

    def validate(model):
        calls.append(len(calls) + 1)
        return values[len(calls)]

    return validate, calls


def rows():
    tok = build_tokenizer()
    task = AdditionTask(99, 12, True, 0.75)
    return tok, [_tokenize(tok, PromptFormat(), {"prompt": p, "completion": c}) for p, c in task.demonstrations(64, 0)]


def test_sft_resumes_after_a_kill_without_losing_or_repeating_an_epoch(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    tok, data = rows()
    reference = build_model(tok, SHAPE, seed=0)
    validate, _ = scripted_validation()
    whole = run_sft(reference, tok, data, validate, out_dir=tmp_path / "whole" / "trainer", cfg=CFG)
    assert list((tmp_path / "whole" / "tensorboard").glob("events.out.tfevents.*"))  # loss and val/accuracy

    from trl import SFTTrainer

    class KilledTrainer(SFTTrainer):
        def __init__(self, *args, callbacks=(), **kwargs):
            super().__init__(*args, callbacks=[*callbacks, KillAfterSave(2)], **kwargs)

    validate, calls = scripted_validation()
    monkeypatch.setattr("trl.SFTTrainer", KilledTrainer)
    with pytest.raises(Killed):
        run_sft(build_model(tok, SHAPE, seed=0), tok, data, validate, out_dir=tmp_path / "run", cfg=CFG)
    monkeypatch.setattr("trl.SFTTrainer", SFTTrainer)
    assert calls == [1, 2]

    later = iter([0.2, 0.25])  # epochs 3 and 4 only: validating epoch 1 or 2 again would run out
    resumed_model = build_model(tok, SHAPE, seed=0)  # a fresh process starts from the initial weights
    resumed = run_sft(resumed_model, tok, data, lambda model: next(later), out_dir=tmp_path / "run", cfg=CFG)
    assert [e for e, _ in resumed.history] == [1, 2, 3, 4]
    assert resumed.history == whole.history and resumed.best_epoch == whole.best_epoch == 2
    for (name, a), b in zip(reference.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # both hold the best (epoch-2) weights
