"""Learner -> rollout engine weight transfer through shared memory (tmpfs).

The learner writes its weights as one safetensors file under `/dev/shm` (a RAM-backed file
system where it exists, else the system temp dir); the rollout worker tells its running vLLM
engine to reload from that directory (`RolloutEngine.reload_weights`). Each version gets its own
directory; old ones are removed once newer ones exist.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def shared_memory_root(tag: str) -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=f"rlpost-{tag}-", dir=base))


def exportable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as vLLM loads them: contiguous, and without the tied output embedding."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return {
        name: tensor.detach().contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }


class WeightPublisher:
    """Writes successive policy versions for the rollout engine to load; keeps the newest `keep`."""

    def __init__(self, tag: str, keep: int = 3):
        self.root = shared_memory_root(tag)
        self.keep = keep
        self._published: list[Path] = []

    def publish(self, model: torch.nn.Module, version: int) -> tuple[Path, float]:
        start = time.perf_counter()
        directory = self.root / f"v{version:06d}"
        directory.mkdir(parents=True, exist_ok=True)
        save_file(exportable_state_dict(model), directory / "model.safetensors")
        self._published.append(directory)
        while len(self._published) > self.keep:
            shutil.rmtree(self._published.pop(0), ignore_errors=True)
        return directory, time.perf_counter() - start

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
