"""Shared fixtures: a tiny locally built Qwen2 model and its character tokenizer (no model hub)."""

from __future__ import annotations

import pytest

TINY_SHAPE_KW = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """One tiny SFT-only run of the quickstart through the real CLI (tests/spine_helpers.py), shared by
    every test that only pays for an RL stage after it (they copy it, never change it)."""
    from tests.spine_helpers import make_tiny_sft_run

    return make_tiny_sft_run(tmp_path_factory.mktemp("tiny-sft"))


@pytest.fixture(scope="session")
def tokenizer():
    from rlpost.modeling import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def make_tiny_model(tokenizer):
    """A factory: `make_tiny_model(seed)` builds a fresh 1-layer, 32-wide float32 Qwen2 model.

    Torch runs single-threaded meanwhile: on the shared 2-core machine, tiny forward passes were
    about 20x faster with one thread than with two contended ones."""
    import torch

    from rlpost.modeling import ModelShape, build_model

    def make(seed: int = 0):
        return build_model(tokenizer, ModelShape(**TINY_SHAPE_KW), seed=seed)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make
    torch.set_num_threads(threads)
