"""Test helper: build a tiny chat model directory with a locally trained byte-level BPE tokenizer.

`build_bpe_model_dir(directory, corpus=[...])` trains a byte-level BPE tokenizer on `corpus` with the
`tokenizers` library (special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`), gives it a
ChatML chat template in Qwen2's style (turns written `<|im_start|>role\\n...<|im_end|>\\n`, generation
prompt `<|im_start|>assistant\\n`, no default system turn), and saves it with a randomly initialised
float32 `Qwen2ForCausalLM`: a real-tokenizer model that transformers, TRL and vLLM load, built
without a model hub.

The tokenizer's pipeline is exactly Qwen2's (NFC normaliser; a Split on Qwen2's pre-tokenizer regex,
then the ByteLevel pre-tokenizer; ByteLevel decoder): transformers 5 loads any `model_type: qwen2`
directory's tokenizer as `Qwen2Tokenizer`, which rebuilds that pipeline around the saved vocabulary
and merges, so a tokenizer trained with plain ByteLevel pre-tokenization would split text
differently once reloaded (by vLLM, TRL or AutoTokenizer) than it did when it was trained.
"""

from __future__ import annotations

from pathlib import Path

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's pre-tokenizer regex (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX)
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
_MIN_HEAD_DIM = 32  # vLLM's CPU attention rejects smaller heads


def train_bpe_tokenizer(corpus: list[str], vocab_size: int = 512, max_positions: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `corpus`, with the ChatML template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + special tokens), got {vocab_size}")
    if not corpus:
        raise ValueError("corpus must hold at least one text to train the tokenizer on")
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=IM_END, pad_token=ENDOFTEXT,
                                        padding_side="left", model_max_length=max_positions)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _check_shape(hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
    if hidden_size % num_heads or hidden_size // num_heads < _MIN_HEAD_DIM:
        raise ValueError(f"hidden_size / num_heads must be a whole number >= {_MIN_HEAD_DIM} "
                         f"(vLLM's CPU attention), got {hidden_size} / {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")


def build_bpe_model_dir(
    directory: str | Path,
    *,
    corpus: list[str],
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    max_positions: int = 512,
    dropout: float = 0.0,
    seed: int = 0,
) -> Path:
    """Train the tokenizer, build a float32 Qwen2 model (attention_dropout=dropout), save both."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlpost.modeling import save_pretrained

    _check_shape(hidden_size, num_heads, num_kv_heads)
    tokenizer = train_bpe_tokenizer(corpus, vocab_size, max_positions)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, attention_dropout=dropout, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT), dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_pretrained(model, tokenizer, directory)
