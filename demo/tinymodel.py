"""Build a tiny HF causal LM + tokenizer folder locally (no hub access), loadable by
transformers and vLLM alike. Used by tests and by the embedded demo.

    path = build_tiny_model("/tmp/tiny", texts=[...], layers=2, hidden=128)

The tokenizer is a byte-level BPE trained on the given texts (any string round-trips), with the
rollout tags as single special tokens. The model is a randomly initialised Qwen2 (the family of
Search-R1's base models) saved as safetensors in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

TAGS = ["<think>", "</think>", "<search>", "</search>", "<information>", "</information>",
        "<answer>", "</answer>"]
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]

DEFAULT_TEXTS = [
    "question: what is the capital of zorland ? <think> i should search </think> "
    "<search> capital of zorland </search> <information> Doc 1(Title: zorland) the capital of "
    "zorland is mirabel . </information> <answer> mirabel </answer>",
    "the quick brown fox jumps over the lazy dog . 0 1 2 3 4 5 6 7 8 9",
    "Answer the question. Reason inside <think> and </think>, search with <search> query </search>,"
    " read <information> results </information>, and answer inside <answer> and </answer>.",
]


def build_tokenizer(texts: list[str], out: Path, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + TAGS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # unk = an existing special token: a byte-level BPE never needs one, and without it the Qwen2
    # tokenizer class (picked on reload from the model's config) would add "<|endoftext|>" at an
    # id past the model's vocabulary
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", unk_token="<|pad|>", additional_special_tokens=TAGS)
    fast.model_max_length = 4096
    fast.save_pretrained(str(out))
    return fast


def build_tiny_model(out: str | Path, texts: list[str] | None = None, layers: int = 2, hidden: int = 128,
                     heads: int = 2, kv_heads: int | None = None, intermediate: int | None = None,
                     vocab_size: int = 1024, max_positions: int = 4096, seed: int = 0,
                     tie_embeddings: bool = True) -> Path:
    """Write tokenizer + randomly initialised Qwen2 model to `out`; returns the folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(texts or DEFAULT_TEXTS, out, vocab_size)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        torch_dtype="float32", use_sliding_window=False, rope_theta=10000.0)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out
