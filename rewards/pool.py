"""Isolated reward execution: a process pool with a hard per-call timeout and failure accounting.

Every call of a reward function runs in a worker process of a ``pebble.ProcessPool`` started
with the ``forkserver`` method (``spawn`` where that is missing): the host runs torch threads,
and forking it is unsafe. Workers resolve functions by name or dotted path (see
``rewards.registry``), so a function must be importable. A call that hangs past its timeout has
its worker killed and replaced; a worker that dies is replaced too. Each failure costs only that
function's values for that call (or, for a bad value, that one value), which become ``None``,
and is counted per function:

    timeouts      no result within ``timeout_s`` (the worker is killed)
    exceptions    the function raised (``SystemExit`` included: the host never sees it)
    crashes       the worker process died (e.g. ``os.abort()``, a segfault, the OOM killer)
    wrong_length  the result is not a list of one value per sample (calls)
    nan           single values that are NaN, +-inf or not numbers (values, not calls)

The first failure of each kind for each function is logged (logger ``rlpost.rewards``) with the
function's name; later ones are only counted. Counters are cumulative over the pool's life.

Combination of ``K`` functions with weights ``w_k`` for sample ``i``, where ``r_ki`` is the
value of function ``k`` (``None``: "not applicable", TRL's convention) and ``F_i`` is the set of
functions that failed for sample ``i`` (any failure kind above)::

    A_i     = {k : r_ki is not None}
    total_i = None                            if F_i is not empty or A_i is empty  ("masked")
              sum over k in A_i of w_k * r_ki  otherwise

A masked sample has no reward and must not be trained on (a failure is not a score of 0, and
a sum over the functions that happened to work would change the objective). ``None`` from one
function while another gives a value is fine: that function does not apply to the sample.
``RewardResult.masked`` counts the masked samples of a batch; ``stats()`` has the cumulative
``reward/samples`` and ``reward/masked_samples``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import multiprocessing
import re
import threading
import time
import traceback
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pebble

from rewards.errors import UserError
from rewards.registry import RewardSpec, resolve

log = logging.getLogger("rlpost.rewards")

FAILURE_KINDS = ("timeouts", "exceptions", "crashes", "wrong_length", "nan")
RESERVED_ARGS = ("prompts", "completions", "completion_ids")
LATENCY_WINDOW = 10_000  # latency percentiles are over each function's most recent calls


@dataclass
class RewardResult:
    """Scores for one batch: per function (None = not applicable or failed) and combined.

    ``total[i]`` is the weighted sum, or None when sample ``i`` is masked (a function failed for
    it, or none gave a value; see the module docstring). ``applicable[i]``: some function gave a
    value; ``failed[i]``: some function failed for it.
    """

    per_function: dict[str, list[float | None]]
    total: list[float | None]
    applicable: list[bool]
    failed: list[bool]

    @property
    def masked(self) -> int:
        """Number of samples whose total is None."""
        return sum(t is None for t in self.total)


@dataclass
class _Outcome:
    """What a worker sends back for one call (always picklable)."""

    values: list[float | None] | None
    failure: str | None = None  # one of FAILURE_KINDS for a failed call
    detail: str = ""
    nan_at: list[int] = field(default_factory=list)  # positions of NaN, inf or non-number values
    elapsed_s: float = 0.0


@dataclass
class _FunctionStats:
    calls: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAILURE_KINDS, 0))
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


def latency_percentiles(latencies: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and max of call latencies in seconds ({} when there are none).

    Percentiles interpolate linearly between order statistics: with sorted values
    x_0 <= ... <= x_{n-1}, the p-th percentile sits at rank r = p/100 * (n - 1) and equals
    x_floor(r) + (r - floor(r)) * (x_ceil(r) - x_floor(r)). For [1, 2, 3, 4]: p50 = 2.5, p90 = 3.7.
    """
    if len(latencies) == 0:
        return {}
    values = np.asarray(latencies, dtype=float)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(values.max())}


def _clean_value(value: Any) -> float | None:
    """A finite float, or None for NaN, inf and non-numbers (strings are never parsed)."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    except Exception:  # any failure to convert (TypeError, OverflowError, a hostile __float__)
        return None
    return number if math.isfinite(number) else None


def _check_values(out: Any, n: int) -> _Outcome:
    """Validate a function's return value against the number of samples."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy arrays, tensors
    if not isinstance(out, (list, tuple)):
        detail = f"returned a {type(out).__name__}, not a list of {n} values"
        return _Outcome(None, "wrong_length", detail)
    if len(out) != n:
        return _Outcome(None, "wrong_length", f"returned {len(out)} values for {n} samples")
    values = [None if v is None else _clean_value(v) for v in out]
    nan_at = [j for j, (raw, v) in enumerate(zip(out, values)) if raw is not None and v is None]
    detail = f"returned {out[nan_at[0]]!r} (NaN, inf or not a number)" if nan_at else ""
    return _Outcome(values, None, detail, nan_at)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _call_in_worker(name: str, n: int, kwargs: dict[str, Any], args: dict[str, Any]) -> _Outcome:
    """Runs inside a worker process: resolve, call with the batch and the recipe's `args` (async
    functions via asyncio.run), validate."""
    start = time.perf_counter()
    try:
        out = resolve(name)(**{**kwargs, **args})
        if asyncio.iscoroutine(out) or hasattr(out, "__await__"):
            out = asyncio.run(_await(out))
        outcome = _check_values(out, n)  # inside the try: len() or tolist() of garbage may raise
    except BaseException:  # process boundary: user code may raise anything, SystemExit included
        outcome = _Outcome(None, "exceptions", traceback.format_exc(limit=-8).strip())
    outcome.elapsed_s = time.perf_counter() - start
    return outcome


def _check_in_worker(name: str) -> tuple[str | None, int | None]:
    """Runs inside a worker process: (None, the function's `max_rows_per_call` or None) when it
    resolves, else (the error message, None)."""
    try:
        function = resolve(name)
    except BaseException as exc:  # process boundary: report any import-time failure as a message
        if isinstance(exc, UserError):
            return str(exc), None
        return f"reward {name!r}: importing it failed: {exc!r}", None
    rows = getattr(function, "max_rows_per_call", None)
    return None, rows if isinstance(rows, int) and rows >= 1 else None


def _mp_context() -> Any:
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _tag(name: str) -> str:
    """A TensorBoard-safe tag for a reward name or dotted path."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class RewardPool:
    """Runs reward functions in worker processes; use as a context manager.

    ``workers`` processes serve all functions. A batch is split into chunks of ``chunk_size``
    samples (default: one chunk per worker), and no larger than the ``max_rows_per_call`` any
    function declares as an attribute (a function whose time grows with its rows, such as
    ``code_tests``, so that its ``timeout_s`` bounds one call); each (function, chunk) pair is one
    call with the function's ``timeout_s``. ``start_timeout_s`` bounds the start-up check that every
    function imports; ``close_timeout_s`` bounds shutdown.

    Latency percentiles cover calls that returned or raised, timed inside the worker (a
    function's first call in a worker includes importing its module). Call ``score`` from one
    thread at a time; ``close`` while a ``score`` is running elsewhere leaves that ``score``
    waiting until its host-side deadline.
    """

    def __init__(self, specs: list[RewardSpec], workers: int = 2, chunk_size: int | None = None,
                 start_timeout_s: float = 60.0, close_timeout_s: float = 10.0):
        if not specs:
            raise UserError("no reward functions given: list at least one under 'rewards'")
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise UserError(f"reward names must be unique, got {names}")
        if workers < 1 or (chunk_size is not None and chunk_size < 1):
            raise UserError(f"reward pool needs workers >= 1 and chunk_size >= 1, "
                            f"got workers={workers}, chunk_size={chunk_size}")
        self.specs = list(specs)
        self.workers = workers
        self.chunk_size = chunk_size
        self.start_timeout_s = start_timeout_s
        self.close_timeout_s = close_timeout_s
        self._stats = {name: _FunctionStats() for name in names}
        self._samples = 0
        self._masked = 0
        self._logged: set[tuple[str, str]] = set()
        self._pool: pebble.ProcessPool | None = None
        self.max_rows_per_call: int | None = None  # the smallest any function declares (see `start`)

    def __enter__(self) -> RewardPool:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start the workers and check that every function resolves (UserError if not)."""
        pool = self._ensure_pool()
        futures = [pool.schedule(_check_in_worker, args=(s.name,)) for s in self.specs]
        for spec, future in zip(self.specs, futures):
            try:
                problem, rows = future.result(timeout=self.start_timeout_s)
                if rows is not None:
                    self.max_rows_per_call = min(rows, self.max_rows_per_call or rows)
            except concurrent.futures.TimeoutError:
                future.cancel()
                problem = f"reward {spec.name!r}: importing it took more than {self.start_timeout_s} s"
            except Exception as exc:  # a crash while importing
                problem = f"reward {spec.name!r}: the worker died while importing it ({exc!r})"
            if problem:
                self.close()
                raise UserError(problem)

    def _ensure_pool(self) -> pebble.ProcessPool:
        if self._pool is not None and not self._pool.active:
            log.warning("reward worker pool broke down; starting a new one")
            self.close()
        if self._pool is None:
            self._pool = pebble.ProcessPool(max_workers=self.workers, context=_mp_context())
        return self._pool

    def score(self, prompts: Sequence[Any], completions: Sequence[Any],
              completion_ids: Sequence[Any] | None = None,
              columns: dict[str, Sequence[Any]] | None = None) -> RewardResult:
        """Score a batch with every function; failures become None (see the module docstring)."""
        n = len(completions)
        columns = dict(columns or {})
        self._check_batch(n, prompts, completion_ids, columns)
        per_function: dict[str, list[float | None]] = {s.name: [None] * n for s in self.specs}
        failed = [False] * n
        if n:
            self._run_calls(n, prompts, completions, completion_ids, columns, per_function, failed)
        result = self._combine(per_function, failed)
        self._samples += n
        self._masked += result.masked
        return result

    @staticmethod
    def _check_batch(n: int, prompts: Sequence[Any], completion_ids: Sequence[Any] | None,
                     columns: dict[str, Sequence[Any]]) -> None:
        lengths = {"prompts": len(prompts), **{k: len(v) for k, v in columns.items()}}
        if completion_ids is not None:
            lengths["completion_ids"] = len(completion_ids)
        for key, length in lengths.items():
            if length != n:
                raise ValueError(f"{key} has {length} entries for {n} completions")
        clash = sorted(set(columns) & set(RESERVED_ARGS))
        if clash:
            raise ValueError(f"column {clash[0]!r} clashes with a reward-function argument")

    def _run_calls(self, n: int, prompts: Sequence[Any], completions: Sequence[Any],
                   completion_ids: Sequence[Any] | None, columns: dict[str, Sequence[Any]],
                   per_function: dict[str, list[float | None]], failed: list[bool]) -> None:
        """Run every (function, chunk) call; fill ``per_function`` and flag in ``failed`` each
        sample that lost a value to a failed call or a bad value."""
        chunks = _chunks(n, min(self.chunk_size or math.ceil(n / self.workers), self.max_rows_per_call or n))
        calls = []
        for lo, hi in chunks:
            kwargs = {"prompts": list(prompts[lo:hi]), "completions": list(completions[lo:hi]),
                      "completion_ids": None if completion_ids is None else list(completion_ids[lo:hi]),
                      **{key: list(values[lo:hi]) for key, values in columns.items()}}
            for spec in self.specs:
                calls.append((spec, lo, hi, self._schedule(spec, hi - lo, kwargs)))
        deadline = self._deadline(len(calls))
        for spec, lo, hi, future in calls:
            outcome = self._collect(spec, future, deadline)
            self._account(spec.name, outcome)
            if outcome.values is None:
                failed[lo:hi] = [True] * (hi - lo)
            else:
                per_function[spec.name][lo:hi] = outcome.values
                for j in outcome.nan_at:
                    failed[lo + j] = True

    def _schedule(self, spec: RewardSpec, n: int, kwargs: dict[str, Any]) -> pebble.ProcessFuture:
        try:
            pool = self._ensure_pool()
            return pool.schedule(_call_in_worker, args=(spec.name, n, kwargs, spec.args), timeout=spec.timeout_s)
        except RuntimeError:  # the pool broke between the check and the call: rebuild once
            self.close()
            return self._ensure_pool().schedule(_call_in_worker, args=(spec.name, n, kwargs, spec.args),
                                                timeout=spec.timeout_s)

    def _deadline(self, n_calls: int) -> float:
        """A host-side bound on waiting, a guard should the pool itself stall: every call
        queued behind the others at the longest timeout, plus 30 s for restarting workers."""
        longest = max(spec.timeout_s for spec in self.specs)
        return time.monotonic() + longest * (math.ceil(n_calls / self.workers) + 1) + 30.0

    @staticmethod
    def _collect(spec: RewardSpec, future: pebble.ProcessFuture, deadline: float) -> _Outcome:
        """Wait for one call and turn every way it can fail into an _Outcome."""
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            if not future.done():
                future.cancel()  # host-side guard expired: the pool kills the worker
            detail = f"no result within {spec.timeout_s} s; the worker was killed"
            return _Outcome(None, "timeouts", detail)
        except CancelledError:
            return _Outcome(None, "timeouts", "the call was cancelled after the pool stalled")
        except pebble.ProcessExpired as exc:
            return _Outcome(None, "crashes", f"the worker process died (exit code {exc.exitcode})")
        except Exception as exc:  # pool-level failures (broken pool, unpicklable arguments)
            return _Outcome(None, "crashes", f"the call could not run: {exc!r}")

    def _account(self, name: str, outcome: _Outcome) -> None:
        stats = self._stats[name]
        stats.calls += 1
        if outcome.failure in (None, "exceptions", "wrong_length"):  # calls that returned or raised
            stats.latencies.append(outcome.elapsed_s)
        if outcome.failure is not None:
            self._record(name, outcome.failure, 1, outcome.detail)
        if outcome.nan_at:
            self._record(name, "nan", len(outcome.nan_at), outcome.detail)

    def _record(self, name: str, kind: str, count: int, detail: str) -> None:
        self._stats[name].counts[kind] += count
        if (name, kind) in self._logged:
            return
        self._logged.add((name, kind))
        log.warning("reward function %r failed (%s): %s\n(later %s of %r are counted in "
                    "reward/%s/%s, not logged)", name, kind, detail, kind, name, _tag(name), kind)

    def _combine(self, per_function: dict[str, list[float | None]], failed: list[bool]) -> RewardResult:
        """The weighted totals, None for masked samples (see the module docstring)."""
        total: list[float | None] = []
        applicable = []
        for i, sample_failed in enumerate(failed):
            values = [(spec.weight, per_function[spec.name][i]) for spec in self.specs]
            given = [w * v for w, v in values if v is not None]
            applicable.append(bool(given))
            total.append(None if sample_failed or not given else sum(given))
        return RewardResult(per_function, total, applicable, list(failed))

    def counts(self) -> dict[str, dict[str, int]]:
        """Per function: ``calls`` and one counter per failure kind (cumulative)."""
        return {name: {"calls": s.calls, **s.counts} for name, s in self._stats.items()}

    def stats(self) -> dict[str, float]:
        """Flat metrics for TensorBoard: ``reward/samples`` and ``reward/masked_samples`` (samples
        scored, and those whose total is None), ``reward/<tag>/<counter>`` and
        ``reward/<tag>/latency_<p>_s`` (p50, p90, p99, max) where the tag is the name with
        characters other than letters, digits, ``_.-`` replaced by ``_``; counters are cumulative."""
        out: dict[str, float] = {"reward/samples": float(self._samples),
                                 "reward/masked_samples": float(self._masked)}
        for name, s in self._stats.items():
            tag = _tag(name)
            out[f"reward/{tag}/calls"] = float(s.calls)
            out.update({f"reward/{tag}/{kind}": float(c) for kind, c in s.counts.items()})
            latency = latency_percentiles(s.latencies)
            out.update({f"reward/{tag}/latency_{p}_s": v for p, v in latency.items()})
        return out

    def close(self) -> None:
        """Stop the workers without waiting for pending calls; never blocks past close_timeout_s."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.stop()
        joiner = threading.Thread(target=pool.join, name="reward-pool-join", daemon=True)
        joiner.start()
        joiner.join(self.close_timeout_s)
        if joiner.is_alive():
            log.warning("reward worker pool did not stop within %.0f s; leaving it behind",
                        self.close_timeout_s)
