"""Learner -> rollout engine weight transfer through shared memory (tmpfs).

The learner writes its weights as one safetensors file under `/dev/shm` (a RAM-backed file
system where it exists, else the system temp dir); the rollout worker tells its running vLLM
engine to reload from that directory (`RolloutEngine.reload_weights`). Each version gets its own
directory; old ones are removed once newer ones exist.

Leftovers. A run that is killed never calls `close()`, and its copies would hold RAM until reboot.
Each publisher's root is named `rlpost-<tag>-pid<PID>-<random>` and holds an `owner.json` with the
owning process's PID, its start time (field 22 of /proc/PID/stat, which tells a reused PID from the
original process), the host and the PID namespace. On construction a publisher removes

- every `rlpost-<tag>-...` root of its own tag whose owner is dead, and roots of its own tag in the
  old unowned naming (`rlpost-<tag>-<random>`, written before owners were recorded);
- roots of other tags only when their recorded owner is known to be dead: same host and PID
  namespace, and /proc/PID is gone, a zombie, or a different process (other start time).

A root whose owner is alive (another run with the same tag, or a second publisher of this process)
or cannot be judged, or that belongs to another user, is kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger("rlpost.weight_sync")

OWNER_FILE = "owner.json"
_RANDOM = r"[a-z0-9_]+"  # tempfile.mkdtemp's random suffix alphabet
_OWNED = re.compile(rf"^rlpost-(?P<tag>.+)-pid(?P<pid>\d+)-{_RANDOM}$")


def shared_memory_base() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a live /proc entry, None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[19])


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_record() -> dict:
    """What identifies this process as the owner of a shared-memory root."""
    stat = _proc_stat(os.getpid()) if Path("/proc/self/stat").exists() else None
    return {"pid": os.getpid(), "start_time": stat[1] if stat else None, "host": socket.gethostname(),
            "pid_namespace": _pid_namespace()}


def owner_is_dead(owner: dict) -> bool:
    """True only when the recorded owner process is certainly gone (see the module docstring)."""
    if owner.get("host") != socket.gethostname() or owner.get("pid_namespace") != _pid_namespace():
        return False  # another machine or container: its PIDs mean nothing here
    if not Path("/proc/self/stat").exists():
        return False  # no /proc: cannot tell a live process from a reused PID
    try:
        pid = int(owner["pid"])
        stat = _proc_stat(pid)
    except (KeyError, TypeError, ValueError, OSError, IndexError):
        return False
    if stat is None:
        return True
    state, start_time = stat
    if state in ("Z", "X"):
        return True
    recorded = owner.get("start_time")
    return recorded is not None and int(recorded) != start_time


def _read_owner(root: Path, name_pid: int) -> dict:
    try:
        owner = json.loads((root / OWNER_FILE).read_text())
        if isinstance(owner, dict) and int(owner.get("pid", -1)) == name_pid:
            return owner
    except (OSError, ValueError, TypeError):
        pass
    # killed before owner.json was written: the PID in the name, without a start time
    return {"pid": name_pid, "start_time": None, "host": socket.gethostname(), "pid_namespace": _pid_namespace()}


def remove_leftovers(tag: str, base: Path | None = None, keep: Path | None = None) -> list[Path]:
    """Remove shared-memory roots left by dead runs (see the module docstring); returns those removed."""
    base = shared_memory_base() if base is None else base
    legacy = re.compile(rf"^rlpost-{re.escape(tag)}-{_RANDOM}$")
    removed = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith("rlpost-") or entry == keep or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if hasattr(os, "getuid") and entry.stat().st_uid != os.getuid():
                continue  # another user's: not ours to judge (and /proc may hide their processes)
        except OSError:
            continue
        owned = _OWNED.match(entry.name)
        if owned:
            stale = owner_is_dead(_read_owner(entry, int(owned["pid"])))
        else:
            stale = legacy.match(entry.name) is not None
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
    if removed:
        log.info("removed %d leftover weight copies under %s: %s", len(removed), base,
                 ", ".join(p.name for p in removed))
    return removed


def shared_memory_root(tag: str) -> Path:
    """A fresh root `rlpost-<tag>-pid<PID>-<random>` with this process recorded as its owner."""
    root = Path(tempfile.mkdtemp(prefix=f"rlpost-{tag}-pid{os.getpid()}-", dir=shared_memory_base()))
    (root / OWNER_FILE).write_text(json.dumps(owner_record()))
    return root


def exportable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as vLLM loads them: contiguous, without the tied output embedding, and for
    a peft LoRA model the merged weights W + scaling * B A under the base model's names."""
    from peft import PeftModel

    tied = getattr(model.config, "tie_word_embeddings", False)
    if isinstance(model, PeftModel):
        state = merged_state_dict(model)
    else:
        state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    return {name: tensor for name, tensor in state.items() if not (tied and name == "lm_head.weight")}


def merged_state_dict(model) -> dict:
    """The full weights a peft LoRA model computes, W + scaling * B A per adapted layer, under the base
    model's own parameter names; the model itself is not modified (no merge/unmerge round trip, which
    would drift the base weights by rounding a little at every sync)."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        deltas = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        key = f"{name}.base_layer.weight"
                        deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter)
        return {base_name(key): (tensor + deltas[key] if key in deltas else tensor).detach().contiguous()
                for key, tensor in model.state_dict().items() if "lora_" not in key}


def base_name(peft_key: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` -> `model.layers.0.self_attn.q_proj.weight`."""
    return peft_key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def adapter_dir(version_dir: str | Path) -> Path:
    """Where a published version keeps a LoRA adapter (apart from full weights, which vLLM's
    `reload_weights` reads from every safetensors file directly in the version's directory)."""
    return Path(version_dir) / "adapter"


class WeightPublisher:
    """Writes successive policy versions for the rollout engine to load; keeps the newest `keep`.

    Construction first removes the leftovers of killed runs (`remove_leftovers`)."""

    def __init__(self, tag: str, keep: int = 3):
        self.removed_leftovers = remove_leftovers(tag)
        self.root = shared_memory_root(tag)
        self.keep = keep
        self._published: list[Path] = []

    def publish(self, model: torch.nn.Module, version: int, form: str = "full") -> tuple[Path, float]:
        """Write `version` of `model`; returns its directory and the seconds taken (`last_bytes`: its size).

        `form`: "full" (model.safetensors: all weights, merged for a LoRA model), "adapter" (a peft
        LoRA model's adapter files only, in `adapter/`, which `adapter_dir` names) or "both" (the
        start of a LoRA run, before the engine has said which it loads)."""
        if form not in ("full", "adapter", "both"):
            raise ValueError(f"form {form!r}: use 'full', 'adapter' or 'both'")
        start = time.perf_counter()
        directory = self.root / f"v{version:06d}"
        directory.mkdir(parents=True, exist_ok=True)
        if form in ("adapter", "both"):
            model.save_pretrained(str(adapter_dir(directory)), safe_serialization=True)  # peft: adapter only
        if form in ("full", "both"):
            save_file(exportable_state_dict(model), directory / "model.safetensors")
        self.last_bytes = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        self._published.append(directory)
        while len(self._published) > self.keep:
            shutil.rmtree(self._published.pop(0), ignore_errors=True)
        return directory, time.perf_counter() - start

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
