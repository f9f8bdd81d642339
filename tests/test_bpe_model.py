"""The BPE test-model helper: the directory loads, the chat template renders, PromptFormat matches it."""

from __future__ import annotations

import json

import pytest

from rlpost.prompting import PromptFormat
from tests.bpe_model import IM_END, IM_START, build_bpe_model_dir, train_bpe_tokenizer

CORPUS = [
    "Question: Natalia sold 48 clips in April and half as many in May. How many in all?\nAnswer: 72",
    "The quick brown fox jumps over the lazy dog, 1234 times.",
    "You are a helpful assistant. Reason step by step, then answer.",
] * 10
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_bpe_model_dir(tmp_path_factory.mktemp("bpe") / "model", corpus=CORPUS, vocab_size=320,
                               max_positions=128, dropout=0.1)


def test_directory_loads_with_auto_classes(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert (model_dir / "model.safetensors").is_file()
    assert len(tokenizer) == model.config.vocab_size == 320
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    assert model.dtype == torch.float32 and model.config.attention_dropout == 0.1
    assert model.config.hidden_size // model.config.num_attention_heads >= 32
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "qwen2"
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], 320)


def test_reloaded_tokenizer_splits_text_as_trained(model_dir):
    from transformers import AutoTokenizer

    trained = train_bpe_tokenizer(CORPUS, vocab_size=320, max_positions=128)
    loaded = AutoTokenizer.from_pretrained(model_dir)
    for text in [*CORPUS[:3], "Numbers 2024 and 1,000,000!", "  spaces\n\n and ünïcode ☃", f"{IM_START}x"]:
        assert loaded(text)["input_ids"] == trained(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text


def test_chat_template_renders_chatml(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    without = tokenizer.apply_chat_template(MESSAGES[1:], tokenize=False, add_generation_prompt=False)
    assert without == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"


def test_prompt_format_ids_equal_apply_chat_template_ids(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fmt = PromptFormat(template="Q: {question}", system_prompt="Be brief.")
    row = {"question": "What is 2 + 3?", "answer": "5"}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: What is 2 + 3?"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                             return_dict=False)
    ids = fmt.token_ids(tokenizer, row)
    assert ids == list(expected)
    assert ids.count(tokenizer.convert_tokens_to_ids(IM_START)) == 3  # role markers are single tokens


def test_bad_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hidden_size / num_heads"):
        build_bpe_model_dir(tmp_path, corpus=CORPUS, hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)


def test_evaluate_refuses_two_prompt_settings(model_dir):
    from rlpost.errors import UserError
    from rlpost.evaluation.runner import evaluate

    with pytest.raises(UserError, match="give use_chat_template or prompt_format, not both"):
        evaluate(model_dir, "addition", use_chat_template=True, prompt_format=PromptFormat())


@pytest.mark.slow
def test_vllm_evaluation_uses_the_prompt_format_and_matches_transformers(model_dir):
    """evaluate(prompt_format=...) feeds vLLM PromptFormat's ids; greedy output equals HF greedy.

    (The random tiny model mostly repeats its last prompt token, so the equality is a light check;
    the point is that vLLM runs the templated BPE ids the recipe's format produces.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlpost.evaluation.benchmarks import Benchmark
    from rlpost.evaluation.runner import evaluate

    questions = ["What is 2 + 3?", "How many clips in May?", "Reason step by step: 1234 times?"]
    rows = [{"prompt": q, "question": q, "answer": "5", "reference": None, "verifier": "math"}
            for q in questions]
    fmt = PromptFormat(template="Question: {question}\nAnswer:", system_prompt="Be brief.")
    result = evaluate(model_dir, Benchmark("bpe", rows), max_tokens=8, prompt_format=fmt)
    config = result.config
    assert config["chat_template"] == {"requested": "auto", "applied": True}
    assert config["add_special_tokens"] is False and config["decoding"]["stop"] == []
    assert config["prompt_format"] == {"template": fmt.template, "system_prompt": "Be brief."}

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = []
    for row in rows:
        ids = torch.tensor([fmt.token_ids(tokenizer, row)])
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert [s["completion"] for s in result.samples] == expected
