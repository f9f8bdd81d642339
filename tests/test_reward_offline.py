"""Tests for offline JSONL scoring (`rlpost score`): output rows, summary, bad rows by line."""

from __future__ import annotations

import json

import pytest

from rewards.offline import read_rows, score_file
from rlpost.errors import UserError

try:
    import reward_fixtures as fx
except ImportError:  # tests/ collected as a package
    from tests import reward_fixtures as fx

FX = fx.__name__


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_scores_every_row_and_keeps_its_fields(tmp_path):
    rows = [
        {"prompt": "1+1=", "completion": "2", "answer": "2", "id": 7},
        {"completion": "5", "answer": "4"},
        {"prompt": "3+3=", "completion": "6", "answer": "6", "reward": "stale"},
    ]
    src = write_lines(tmp_path / "in.jsonl", [json.dumps(r) for r in rows[:1]] + [""]
                      + [json.dumps(r) for r in rows[1:]])
    out = tmp_path / "out.jsonl"
    summary = score_file(f"{FX}:match_answer_reward", src, out, workers=2, timeout_s=5)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in written] == [1.0, 0.0, 1.0]
    assert written[0] == {**rows[0], "reward": 1.0}
    assert written[1] == {**rows[1], "reward": 0.0}
    assert summary["count"] == 3 and summary["scored"] == 3
    assert summary["mean"] == pytest.approx(2 / 3)
    assert summary["failures"]["calls"] >= 1
    assert sum(v for k, v in summary["failures"].items() if k != "calls") == 0


def test_batches_give_the_same_rewards(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [json.dumps({"completion": "x" * k}) for k in range(1, 8)])
    out = tmp_path / "out.jsonl"
    summary = score_file(f"{FX}:length_reward", src, out, workers=2, batch_size=3)
    rewards = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    assert rewards == [float(k) for k in range(1, 8)]
    assert summary["mean"] == pytest.approx(4.0)  # (1 + ... + 7) / 7


def test_crashing_reward_gives_null_rewards_and_counts(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", ['{"completion": "a"}', '{"completion": "b"}'])
    out = tmp_path / "out.jsonl"
    summary = score_file(f"{FX}:abort_reward", src, out, workers=1)
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [None, None]
    assert summary["scored"] == 0 and summary["mean"] is None
    assert summary["failures"]["crashes"] == summary["failures"]["calls"] == 1


@pytest.mark.parametrize(
    "lines, words",
    [
        (['{"completion": "a"}', "", "{not json"], ["line 3", "not valid JSON"]),
        (['{"completion": "a"}', '{"prompt": "p"}'], ["line 2", "'completion'"]),
        (['["completion"]'], ["line 1", "list"]),
        (['{"completion": 5}'], ["line 1", "string"]),
        (['{"completion": "a", "completions": "b"}'], ["line 1", "'completions'", "rename"]),
        (["", "  "], ["no rows"]),
    ],
)
def test_bad_rows_name_the_line(tmp_path, lines, words):
    src = write_lines(tmp_path / "in.jsonl", lines)
    with pytest.raises(UserError) as info:
        read_rows(src)
    for word in words:
        assert word in str(info.value)


def test_bad_paths_and_names(tmp_path):
    src = write_lines(tmp_path / "in.jsonl", ['{"completion": "a"}'])
    with pytest.raises(UserError, match="does not exist"):
        score_file(f"{FX}:length_reward", tmp_path / "missing.jsonl", tmp_path / "o.jsonl")
    with pytest.raises(UserError, match="is the input file"):
        score_file(f"{FX}:length_reward", src, src)
    with pytest.raises(UserError, match="output folder"):
        score_file(f"{FX}:length_reward", src, tmp_path / "no" / "o.jsonl")
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        score_file("nope", src, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
