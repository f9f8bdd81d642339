"""RL checkpoints: policy weights, optimiser, RNG and counters, written atomically, checksummed, and
resumed from the newest one that verifies.

Layout of one checkpoint, `RUN/<stage>/checkpoints/step-000040/`:

    policy/          an ordinary model directory vLLM and transformers load (a LoRA stage: the adapter)
    optimizer.pt     the optimiser's state dict (tensors and plain values only)
    rng.json         torch's CPU generator state (base64 bytes) and Python's `random` state, as JSON
    state.json       the counters (`RLState`)
    <extra files>    a learner's own tensors (`extra=`), safetensors
    manifest.json    {"format": 2, "step": N, "files": {relative path: {"size", "sha256"}}}, written last

Writing: everything goes into `checkpoints/.tmp-step-000040/`; every file is hashed (and fsynced) and
`manifest.json` is written last; then the directory is renamed into place. A run killed mid-write
leaves only a `.tmp-*` directory, removed by the next save. Rotation keeps the `keep` newest
checkpoints that pass a quick check (manifest present, every listed file there with its size, no file
the manifest does not list): a damaged older checkpoint is moved aside instead of being counted, so
rotation never deletes the only good one; the checkpoint just written is never deleted.

Verified (`verify_checkpoint`, run by `latest_checkpoint` and `load_checkpoint`): the manifest parses;
every file it lists exists with its size and sha256; no other file is in the directory (nothing
unverified is read on resume); state.json, optimizer.pt, rng.json and policy/ are among the files.
`latest_checkpoint` walks the checkpoints newest first and returns the first that verifies. One that
does not is logged as a warning naming it and the reason, and moved aside to
`checkpoints/corrupt-step-000040/` (`-2`, `-3`, ... if taken): no longer picked, never deleted by
rotation, kept for inspection; delete it by hand. A `step-*` directory with neither a manifest nor a
state.json is not a checkpoint (a foreign or half-copied directory): skipped with a warning, left alone.
`load_checkpoint` on a path that fails raises `CheckpointCorruptError`.

Cost: sha256 reads about 1 GB/s on one core, so the checkpoint of a 360 MB policy (1.1 GB with AdamW's
moments) takes about 1.3 s to hash at save (plus fsync) and as long again each time it is verified.

Older checkpoints (before manifests: `rng.pt` instead of `rng.json`, no `manifest.json`) cannot be
verified. They are accepted, with a warning, when state.json parses and optimizer.pt, rng.pt and policy/
exist, so existing run directories keep resuming; otherwise they are treated as corrupt as above.

Full disk: when a save fails because the disk is full or the quota exceeded (ENOSPC / EDQUOT, also as
reported by safetensors and the tokenizer's Rust writer), the partial `.tmp-*` directory is removed and
`CheckpointWriteError` (a `UserError`: the CLI prints it as one line, exit code 2) says which step could
not be written where, which checkpoint is intact, and to free space and rerun the same command. The
checkpoints already on disk are untouched. Any other error while writing also removes the partial
directory, then propagates unchanged.

Safe loading: nothing in a checkpoint is unpickled as arbitrary objects, since a run directory may come
from elsewhere. optimizer.pt is read with `torch.load(weights_only=True)` (a file that needs more fails
with `CheckpointCorruptError`); the RNG state is JSON; weights are safetensors. An old `rng.pt` is read
with `weights_only=True` too (the old layout, a uint8 tensor and a tuple of ints, loads that way); one
that holds anything else is not unpickled: the RNG is left as it is, with a warning.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlpost.errors import UserError

log = logging.getLogger("rlpost.checkpoint")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # format 1: the layout before manifests (rng.pt, nothing verifiable)
RNG_FILE = "rng.json"
LEGACY_RNG_FILE = "rng.pt"
REQUIRED_FILES = ("state.json", "optimizer.pt", RNG_FILE)
CORRUPT_PREFIX = "corrupt-"
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")
_EDQUOT = getattr(errno, "EDQUOT", None)
# how a full disk reads where no OSError carries the errno: Rust writers (safetensors, tokenizers) put it in text
_DISK_FULL_TEXT = ("no space left on device", f"os error {errno.ENOSPC})", "storagefull")
_QUOTA_TEXT = ("disk quota exceeded", "quotaexceeded") + ((f"os error {_EDQUOT})",) if _EDQUOT else ())
_unverified_warned: set[Path] = set()


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or used; the message says what to do (the CLI prints it as one line)."""


class CheckpointWriteError(CheckpointError):
    """Saving checkpoint `step` to `path` failed because the disk is full (or the quota exceeded); the
    partial directory was removed and `intact` (None when there is none) is the checkpoint a rerun resumes from."""

    def __init__(self, message: str, step: int, path: Path, intact: Path | None):
        super().__init__(message)
        self.step, self.path, self.intact = step, path, intact

    def __reduce__(self):
        return type(self), (str(self), self.step, self.path, self.intact)


class CheckpointCorruptError(CheckpointError):
    """Checkpoint `path` failed verification or holds a file that cannot be loaded safely (`reason`)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} cannot be used: {reason}. Move it aside (or delete it) and rerun "
                         f"the same command to resume from an earlier checkpoint")
        self.path, self.reason = Path(path), reason

    def __reduce__(self):
        return type(self), (self.path, self.reason)


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
    """Write a checkpoint; `extra` maps file names to tensor dicts saved beside it as safetensors.

    Raises `CheckpointWriteError` when the disk is full or the quota exceeded (the partial directory is
    removed, the checkpoints already there are untouched)."""
    root = checkpoint_root(run_dir)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{final.name}"
    for leftover in root.glob(".tmp-step-*"):  # from a run killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        model.save_pretrained(tmp / "policy", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "policy")
        with open(tmp / "optimizer.pt", "wb") as f:  # a Python file: a full disk surfaces as OSError(ENOSPC)
            torch.save(optimizer.state_dict(), f)
        _write_text(tmp / RNG_FILE, json.dumps(_rng_state()))
        for name, tensors in (extra or {}).items():
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / name))
        _write_text(tmp / "state.json", json.dumps(asdict(state)))
        _write_manifest(tmp, state.step)  # last: hashes (and fsyncs) every file above
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
    except Exception as err:
        full = _disk_full(err, root)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            raise
        raise _write_error(full, state.step, final, root) from err
    _rotate(root, keep, final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint in `run_dir` that verifies (`verify_checkpoint`); None when there is none.

    A newer one that fails is logged (a warning naming it and the reason) and moved aside to
    `checkpoints/corrupt-<name>/`; a `step-*` directory without manifest and state.json is skipped."""
    for path in _checkpoints(checkpoint_root(run_dir)):
        if not (path / MANIFEST).exists() and not (path / "state.json").exists():
            log.warning("ignoring %s: it has neither %s nor state.json, so it is not a complete checkpoint",
                        path, MANIFEST)
            continue
        try:
            verify_checkpoint(path)
        except CheckpointCorruptError as err:
            _set_aside(path, err.reason, "resuming from an earlier checkpoint instead")
            continue
        return path
    return None


def verify_checkpoint(path: Path, hashes: bool = True) -> bool:
    """Check checkpoint `path` against its manifest (sizes always, sha256 when `hashes`).

    Returns True when it verifies, False for a checkpoint written before manifests existed that is accepted
    unverified (state.json parses; optimizer.pt, rng.pt and policy/ exist; a warning is logged once).
    Raises `CheckpointCorruptError` with the reason otherwise."""
    path = Path(path)
    problem, unverified = _problem(path, hashes)
    if problem is not None:
        raise CheckpointCorruptError(path, problem)
    if unverified and path not in _unverified_warned:
        _unverified_warned.add(path)
        log.warning("checkpoint %s has no %s (written by an earlier rlpost): accepting it unverified", path, MANIFEST)
    return not unverified


def load_checkpoint(path: Path, model, optimizer, verify: bool = True) -> RLState:
    """Restore weights, optimiser and RNG from `path` into `model`/`optimizer`; return the counters.

    Checks `path` first (`verify_checkpoint`; `verify=False` skips the sha256s, e.g. right after
    `latest_checkpoint` hashed them) and raises `CheckpointCorruptError` when it fails. Nothing is unpickled
    beyond tensors and plain values (`torch.load(weights_only=True)`)."""
    from safetensors.torch import load_file

    from rlpost import lora

    path = Path(path)
    verify_checkpoint(path, hashes=verify)
    if lora.is_peft(model):  # a LoRA stage checkpoints its adapter only
        lora.load_adapter_weights(model, path / "policy")
    else:
        weights = load_file(path / "policy" / "model.safetensors")
        missing, unexpected = model.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, "
                               f"unexpected {unexpected}")
    try:
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    except Exception as err:
        raise CheckpointCorruptError(path, f"optimizer.pt {_unsafe_or_unreadable(err)}") from err
    optimizer.load_state_dict(optimizer_state)
    _restore_rng(path)
    return _read_state(path)


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


# --- checkpoints on disk ---------------------------------------------------------------------------


def _checkpoints(root: Path) -> list[Path]:
    """`step-N` directories under `root`, newest (highest N) first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _CHECKPOINT_NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def _rotate(root: Path, keep: int, written: Path) -> None:
    """Keep the `keep` newest checkpoints that pass the quick check (sizes, no sha256); `written` is never
    removed. One that fails the check is moved aside, not counted, so it cannot displace a good one."""
    kept = 0
    for path in _checkpoints(root):
        if path != written:
            if not (path / MANIFEST).exists() and not (path / "state.json").exists():
                continue  # not a checkpoint (see latest_checkpoint); not ours to delete
            problem, _ = _problem(path, hashes=False)
            if problem is not None:
                _set_aside(path, problem, "not counted among the checkpoints kept")
                continue
            if kept >= max(1, keep):
                shutil.rmtree(path, ignore_errors=True)
                continue
        kept += 1


def _set_aside(path: Path, reason: str, consequence: str) -> Path | None:
    """Move corrupt checkpoint `path` to `corrupt-<name>` beside it and log why; None when it cannot be moved."""
    target, n = path.with_name(CORRUPT_PREFIX + path.name), 2
    while target.exists():
        target, n = path.with_name(f"{CORRUPT_PREFIX}{path.name}-{n}"), n + 1
    try:
        path.rename(target)
    except OSError as err:
        log.warning("checkpoint %s is corrupt: %s; %s (it could not be moved aside: %s)", path, reason,
                    consequence, err)
        return None
    log.warning("checkpoint %s is corrupt: %s; moved it to %s, %s", path, reason, target, consequence)
    return target


def _problem(path: Path, hashes: bool) -> tuple[str | None, bool]:
    """(what is wrong with checkpoint `path` or None, whether it is an unverifiable pre-manifest one)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file() or manifest_path.is_symlink():
        if (path / LEGACY_RNG_FILE).is_file() and not (path / RNG_FILE).exists():
            return _legacy_problem(path), True
        return f"{MANIFEST} is missing", False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT:
            return f"{MANIFEST} has format {manifest.get('format')!r}, this rlpost reads {MANIFEST_FORMAT}", False
        if not all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                   for e in listed.values()):
            raise ValueError("an entry lacks a size or sha256")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})", False
    present, odd = _listing(path)
    present.pop(MANIFEST, None)
    if odd:
        return f"{odd[0]} is a link or not a regular file", False
    for name in REQUIRED_FILES:
        if name not in listed:
            return f"{MANIFEST} does not list {name}", False
    if not any(name.startswith("policy/") for name in listed):
        return f"{MANIFEST} lists no policy/ files", False
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        return f"{', '.join(unlisted[:3])} {'is' if len(unlisted) == 1 else 'are'} not in {MANIFEST}", False
    for name, entry in sorted(listed.items()):  # sizes first: a missing or cut-short file is found without hashing
        if name not in present:
            return f"{name} is missing", False
        size = present[name].stat().st_size
        if size != entry["size"]:
            cut = " (cut short)" if size < entry["size"] else ""
            return f"{name} has {size} bytes, {MANIFEST} says {entry['size']}{cut}", False
    if hashes:
        for name, entry in sorted(listed.items()):
            if _hash_file(present[name])[1] != entry["sha256"]:
                return f"{name} does not match its sha256 in {MANIFEST} (its bytes changed)", False
    return None, False


def _legacy_problem(path: Path) -> str | None:
    """A pre-manifest checkpoint is accepted when its state.json parses and its other parts exist."""
    try:
        _read_state(path)
    except (OSError, ValueError, TypeError) as err:
        return f"it has no {MANIFEST} (an older checkpoint) and its state.json is unreadable ({err})"
    if not (path / "optimizer.pt").is_file():
        return f"it has no {MANIFEST} (an older checkpoint) and optimizer.pt is missing"
    if not (path / "policy").is_dir():
        return f"it has no {MANIFEST} (an older checkpoint) and policy/ is missing"
    return None


def _read_state(path: Path) -> RLState:
    data = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("state.json does not hold an object")
    return RLState(**data)


def _listing(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """({relative posix path: path} of the regular files under `directory`, [links and other odd entries])."""
    files, odd = {}, []
    for here, dirs, names in os.walk(directory):
        for name in sorted(dirs + names):
            p = Path(here, name)
            rel = p.relative_to(directory).as_posix()
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                odd.append(rel)
            elif p.is_file():
                files[rel] = p
    return files, sorted(odd)


def _hash_file(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of the file's bytes; with `fsync`, also flush it to the disk."""
    digest, size = hashlib.sha256(), 0
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
        if fsync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def _write_manifest(directory: Path, step: int) -> None:
    files, odd = _listing(directory)
    if odd:
        raise RuntimeError(f"{directory} holds links or special files, which a checkpoint cannot: {odd}")
    entries = {}
    for name, p in files.items():
        size, sha256 = _hash_file(p, fsync=True)
        entries[name] = {"size": size, "sha256": sha256}
    _write_text(directory / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": entries},
                                                 indent=1, sort_keys=True), fsync=True)
    for here, _, _ in os.walk(directory):
        _fsync_dir(Path(here))


def _write_text(path: Path, text: str, fsync: bool = False) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the directory's entries durable; a filesystem that cannot fsync a directory is let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR, errno.ENOTSUP, errno.EPERM):
            raise
    finally:
        os.close(fd)


# --- a full disk ------------------------------------------------------------------------------------


def _disk_full(err: BaseException, root: Path) -> tuple[str, str] | None:
    """("full" or "quota", the error that says so) when `err` (or an error behind it) is ENOSPC / EDQUOT."""
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or any(t in text for t in _DISK_FULL_TEXT):
            return "full", _first_line(e)
        if isinstance(e, OSError) and _EDQUOT is not None and e.errno == _EDQUOT or any(t in text for t in _QUOTA_TEXT):
            return "quota", _first_line(e)
        e = e.__cause__ or e.__context__
    try:  # a writer that loses the errno (torch's own file writer does): no space left at all says it
        if shutil.disk_usage(root if root.exists() else root.parent).free == 0:
            return "full", _first_line(err)
    except OSError:
        pass
    return None


def _write_error(full: tuple[str, str], step: int, final: Path, root: Path) -> CheckpointWriteError:
    kind, detail = full
    what = "the disk is full" if kind == "full" else "the disk quota is exceeded"
    free = "free space" if kind == "full" else "free space (or raise the quota)"
    intact = next((p for p in _checkpoints(root) if _problem(p, hashes=True)[0] is None), None)
    if intact is None:
        where = (f"No earlier checkpoint exists, so a rerun starts this stage from its beginning. {free.capitalize()} "
                 f"on the disk holding {root} and rerun the same command")
    else:
        size = sum(p.stat().st_size for p in _listing(intact)[0].values())
        where = (f"Checkpoint step {int(intact.name.split('-')[1])} ({intact}) is intact. {free.capitalize()} on the "
                 f"disk holding {root} (the last checkpoint took {_megabytes(size)}) and rerun the same command "
                 f"to resume from it")
    return CheckpointWriteError(f"could not write checkpoint step {step} to {final}: {what} ({detail}). {where}",
                                step, final, intact)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


# --- the RNG, without pickle ------------------------------------------------------------------------


def _rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    return {"torch_cpu": base64.b64encode(bytes(torch.get_rng_state().tolist())).decode("ascii"),
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def _restore_rng(path: Path) -> None:
    if (path / RNG_FILE).is_file():  # verified with the rest of the checkpoint
        try:
            data = json.loads((path / RNG_FILE).read_text(encoding="utf-8"))
            torch_state = torch.tensor(list(base64.b64decode(data["torch_cpu"], validate=True)), dtype=torch.uint8)
            py = data["python"]
            python_state = (int(py["version"]), tuple(int(x) for x in py["internal"]),
                            None if py["gauss_next"] is None else float(py["gauss_next"]))
            random.setstate(python_state)
            torch.set_rng_state(torch_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointCorruptError(path, f"{RNG_FILE} does not hold an RNG state ({err})") from err
        return
    legacy = path / LEGACY_RNG_FILE  # a checkpoint from before manifests: a torch.save'd dict
    try:
        rng = torch.load(legacy, weights_only=True)
        torch_state, (version, internal, gauss_next) = rng["torch"], rng["python"]
        if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8):
            raise TypeError("its torch state is not a uint8 tensor")
        python_state = (int(version), tuple(int(x) for x in internal),
                        None if gauss_next is None else float(gauss_next))
        random.setstate(python_state)
        torch.set_rng_state(torch_state)
    except Exception as err:
        log.warning("not restoring the RNG state from %s: it %s; the resumed run continues with the current RNG "
                    "state, so its random draws differ from an uninterrupted run's", legacy, _unsafe_or_unreadable(err))


def _unsafe_or_unreadable(err: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one line, without torch's advice to unpickle it."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if found or "weights only load failed" in text.lower():
        detail = found.group(1).strip() if found else _first_line(err)
        return f"holds objects other than tensors and plain values and is not unpickled ({detail})"
    return f"cannot be read ({type(err).__name__}: {_first_line(err)})"
