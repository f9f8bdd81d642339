"""RL checkpoints: policy weights, optimiser, RNG and counters, written atomically; resume from the newest.

A checkpoint is a directory `checkpoints/step-000040/` holding `policy/` (an ordinary model
directory vLLM and transformers load), `optimizer.pt`, `rng.pt` and `state.json`. It is written
under a temporary name and renamed into place, so a run killed mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("rlpost.checkpoint")


@dataclass
class RLState:
    """Counters that make a resumed run continue exactly where its checkpoint left off."""

    step: int = 0  # optimiser steps applied == policy version of the weights
    samples_trained: int = 0
    next_prompt_index: int = 0
    staleness: dict = field(default_factory=dict)  # the staleness gate's counts, {"groups": ..., "samples": ...}


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, state: RLState, keep: int = 2,
                    extra: dict[str, dict] | None = None) -> Path:
    """Write a checkpoint; `extra` maps file names to tensor dicts saved beside it as safetensors."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    for leftover in root.glob(".tmp-step-*"):  # from a run killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "policy", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "policy")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
    for name, tensors in (extra or {}).items():
        if tensors:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / name))
    (tmp / "state.json").write_text(json.dumps(asdict(state)))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    complete = [p for p in sorted(root.glob("step-*")) if (p / "state.json").exists()]
    for old in complete[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = [p for p in sorted(checkpoint_root(run_dir).glob("step-*")) if (p / "state.json").exists()]
    return complete[-1] if complete else None


def load_checkpoint(path: Path, model, optimizer) -> RLState:
    """Restore weights, optimiser and RNG from `path` into `model`/`optimizer`; return the counters."""
    from safetensors.torch import load_file

    from rlpost import lora

    if lora.is_peft(model):  # a LoRA stage checkpoints its adapter only
        lora.load_adapter_weights(model, path / "policy")
    else:
        weights = load_file(path / "policy" / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, "
                               f"unexpected {unexpected}")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt"))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return RLState(**json.loads((path / "state.json").read_text()))


def last_trainer_checkpoint(output_dir: Path) -> str | None:
    """The newest complete `checkpoint-N` a transformers Trainer wrote in `output_dir`, for
    `train(resume_from_checkpoint=...)`; None when there is none.

    The Trainer writes a checkpoint in place, `trainer_state.json` last, and `get_last_checkpoint`
    takes the highest N without looking inside: a run killed while writing one would resume from a
    half-written folder. A folder without `trainer_state.json` is removed here instead."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    for folder in output_dir.glob("checkpoint-*"):
        if folder.is_dir() and not (folder / "trainer_state.json").exists():
            log.warning("removing %s: a trainer checkpoint left incomplete by a killed run", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return get_last_checkpoint(str(output_dir))
