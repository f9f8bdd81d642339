"""Code rewards: run a completion against its tests in the sandbox (rewards/code_sandbox.py).

One checker serves the training reward (``code_tests_reward``) and the benchmark scorer
(``check_humaneval`` / ``check_asserts``), so a sample's reward and its score cannot disagree.

Two forms of test:
- HumanEval: program = prompt + completion + "\\n" + test + "\\ncheck(<entry_point>)\\n";
  reward 1.0 when it runs to the end, else 0.0.
- Assert list (MBPP style): reward = (asserts that pass) / (number of asserts). The setup code
  and the completion run once; then each assert runs on its own, in the same process, under a
  ``timeout_s / n`` alarm, so one failing or hanging assert does not stop the others.

Passing is proved by a sentinel, not by the exit code: the harness reads a random nonce (new for
every call) from stdin before any candidate code runs, and only after the tests pass writes
``<nonce> pass <i>`` to a private copy of stdout. ``sys.exit(0)``, ``os._exit(0)``, killing
itself, or printing a fake "pass" therefore earn nothing. Candidate output goes to /dev/null, so
a chatty program cannot push the sentinel past the output limit. The harness binds ``exec``,
``compile``, ``os.write``... before candidate code runs, so replacing builtins does not help.
Limits: the nonce lives in the harness's memory, so code that deliberately inspects the harness
(frames, ``gc``, tracing, ctypes) could still forge it; tests run in the candidate's global
namespace (as in HumanEval), so a candidate can shadow names they use; and an object whose
``__eq__`` always returns True passes ``assert f(x) == y``.

The code is taken from the last fenced block (```python / ```py / ```), preferring the last one
that defines ``entry_point``; an unclosed final fence counts; without fences the whole text.

Time: every sample has its own limits (``TIMEOUT_S`` wall, ``TIMEOUT_S + 1`` s CPU, the
sandbox's memory and process bounds), and ``code_tests_reward`` runs all rows of a call at once
(up to ``PARALLEL_RUNS``), so a call of at most ``PARALLEL_RUNS`` rows ends within
``TIMEOUT_S + 2.5`` s whatever its programs do: a sleeping or looping sample costs its own reward,
never its neighbours' (a reward pool call times out as a whole). Larger calls take
``ceil(rows / PARALLEL_RUNS)`` such rounds at worst; ``call_time_bound_s(rows)`` gives the bound a
caller's per-call timeout must cover. A sandbox that fails to run at all (status ``error``,
``SandboxUnavailable``) raises: a broken sandbox is not a score of 0.
"""

from __future__ import annotations

import math
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from rewards.code_sandbox import run_untrusted
from rewards.errors import UserError

TIMEOUT_S = 6.0  # wall limit of one check (one sandbox run)
PARALLEL_RUNS = 32  # rows of one code_tests_reward call that run at once (each in its own sandbox)
_END_S = 2.5  # a run ends by its wall limit + this: the sandbox's 2 s grace, start-up, reaping


def call_time_bound_s(rows: int, timeout_s: float = TIMEOUT_S) -> float:
    """Longest a ``code_tests_reward`` call of ``rows`` rows can take: its rounds of at most
    ``PARALLEL_RUNS`` concurrent sandbox runs, each ending by ``timeout_s + _END_S``."""
    return math.ceil(max(rows, 1) / PARALLEL_RUNS) * (timeout_s + _END_S)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("", "python", "python3", "py")

# The trusted wrapper. {program}, {tests} and {budget} are filled with Python literals.
_HARNESS = """\
import os as _os, signal as _signal, sys as _sys


class _RlpostTimeout(BaseException):
    pass


def _rlpost_alarm(signum, frame):
    raise _RlpostTimeout()


def _rlpost_run(program, tests, budget):
    # Bind everything the harness uses before candidate code can replace builtins or os.
    run, comp, numbered, caught = exec, compile, enumerate, BaseException
    write, timer, real = _os.write, _signal.setitimer, _signal.ITIMER_REAL
    nonce = _sys.stdin.readline().strip()
    report = _os.dup(1)
    null = _os.open(_os.devnull, _os.O_RDWR)
    _os.dup2(null, 0)
    _os.dup2(null, 1)
    _signal.signal(_signal.SIGALRM, _rlpost_alarm)
    scope = {{"__name__": "__candidate__"}}
    run(comp(program, "<candidate>", "exec"), scope)
    for i, test in numbered(tests):
        timer(real, budget)
        try:
            run(comp(test, "<test %d>" % i, "exec"), scope)
        except caught:
            continue
        finally:
            timer(real, 0)
        write(report, ("%s pass %d\\n" % (nonce, i)).encode())
    _os._exit(0)


_rlpost_run({program}, {tests}, {budget})
"""


def _passed(program: str, tests: list[str], timeout_s: float) -> int:
    """Run ``program`` then each test in one sandbox; count the tests proved to pass."""
    nonce = secrets.token_hex(16)
    budget = max(timeout_s / max(len(tests), 1), 0.05)
    source = _HARNESS.format(program=repr(program), tests=repr(tuple(tests)),
                             budget=repr(budget))
    result = run_untrusted(source, timeout_s=timeout_s, cpu_s=max(1, int(timeout_s) + 1),
                           stdin=nonce + "\n")
    if result.status == "error":  # the sandbox failed, not the program: no score at all
        raise RuntimeError(f"code sandbox could not run the program: "
                           f"{(result.stderr.strip().splitlines() or ['?'])[0]}")
    lines = set(result.stdout.splitlines())
    return sum(f"{nonce} pass {i}" in lines for i in range(len(tests)))


def check_humaneval(prompt: str, completion: str, test: str, entry_point: str,
                    timeout_s: float = TIMEOUT_S) -> bool:
    """True when prompt + completion passes HumanEval's ``check(entry_point)`` in the sandbox."""
    program = prompt + completion + "\n" + test + f"\ncheck({entry_point})\n"
    return _passed(program, ["pass"], timeout_s) == 1


def check_asserts(completion: str, tests: Sequence[str], setup: str = "",
                  timeout_s: float = TIMEOUT_S) -> float:
    """Fraction of ``tests`` (assert statements) that pass after ``setup`` + ``completion`` run.

    fraction = passed / len(tests); 0.0 when the completion itself does not run.
    """
    if not tests:
        raise ValueError("check_asserts needs at least one test")
    program = (setup + "\n" if setup else "") + completion
    return _passed(program, list(tests), timeout_s) / len(tests)


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code in ``text``: the last fenced block (the last defining ``entry_point``), or all."""
    blocks = [code for tag, code in _FENCE.findall(text) if tag.lower() in _PYTHON_TAGS]
    if not blocks:
        return text
    if entry_point:
        defining = [b for b in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\b", b)]
        blocks = defining or blocks
    return blocks[-1]


def _text(message: Any) -> str:
    """A TRL prompt/completion as text: a string, or the last message of a conversation."""
    if isinstance(message, str):
        return message
    if isinstance(message, list) and message and isinstance(message[-1], dict):
        return str(message[-1].get("content", ""))
    return ""


def _column(name: str, values: Sequence | None, n: int) -> Sequence:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise UserError(f"code_tests_reward: column {name!r} has {len(values)} rows for {n} "
                        "completions; give one value per completion")
    return values


def _score_one(i: int, prompt: Any, completion: Any, test: Any, entry_point: Any,
               tests: Any, setup: Any) -> float | None:
    if test and entry_point:
        # A string prompt holds the signature (HumanEval); a chat prompt is not code.
        prefix = prompt if isinstance(prompt, str) else ""
        code = extract_code(_text(completion), entry_point)
        return 1.0 if check_humaneval(prefix, code, test, entry_point) else 0.0
    if tests is None:
        return None
    if isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
        raise UserError(f"code_tests_reward: row {i}: column 'tests' must be a list of assert "
                        "statements (strings)")
    if not tests:
        return None
    return check_asserts(extract_code(_text(completion)), tests, setup or "")


def code_tests_reward(prompts: Sequence[Any], completions: Sequence[Any],
                      completion_ids: Sequence[Any] | None = None, test: Sequence | None = None,
                      entry_point: Sequence | None = None, tests: Sequence | None = None,
                      **kwargs: Any) -> list[float | None]:
    """Fraction of a completion's tests that pass in the sandbox (HumanEval: 1.0 or 0.0).

    Columns: ``test`` + ``entry_point`` (HumanEval form; ``prompts`` holds the signature), or
    ``tests`` (a list of assert statements per row; optional ``test_setup_code``). A row with
    neither gets ``None`` (not applicable). All rows run at once (up to ``PARALLEL_RUNS``), each
    under its own limits, so the call ends within ``call_time_bound_s(len(completions))``.
    """
    n = len(completions)
    cols = [_column("prompts", prompts, n), completions, _column("test", test, n),
            _column("entry_point", entry_point, n), _column("tests", tests, n),
            _column("test_setup_code", kwargs.get("test_setup_code"), n)]
    with ThreadPoolExecutor(max_workers=min(PARALLEL_RUNS, max(n, 1))) as pool:
        return list(pool.map(_score_one, range(n), *cols))


code_tests_reward.max_rows_per_call = PARALLEL_RUNS  # the pool keeps calls to one round
