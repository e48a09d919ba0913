"""Text <-> token ids for the rollout loop, through the tokenizer's Rust backend where that is exact.

    RolloutRunner ──encode(observation / prompt)──▶ TextCodec ──┬─ backend.encode(...).ids   (checked plain)
                  ──decode(turn ids)────────────────▶           └─ the Hugging Face wrapper   (anything else)

A Hugging Face fast tokenizer hands every call to its `tokenizers.Tokenizer`, after 20–70 µs of
Python of its own per call (argument checks, truncation and padding set-up, a BatchEncoding).
The rollout loop encodes an observation, or decodes a turn, about once a turn, so on a small model
that wrapper was a few per cent of the actor's time (docs/BENCHMARKS.md, "The actor against bare
vLLM"). `TextCodec` calls the backend directly only when the wrapper would add nothing to it:

- the tokenizer is a `TokenizersBackend` whose class keeps the base class's encode and decode steps;
- its backend has no truncation or padding of its own (the wrapper turns them off per call);
- the wrapper's `split_special_tokens` is what the backend already does;
- decoding does no clean-up of spaces (the wrapper's `clean_up_tokenization_spaces`);
- a set of probe texts encodes and decodes the same both ways.

Anything else goes through the wrapper, as before.
"""

from __future__ import annotations

import logging

log = logging.getLogger("scout.actors.tokentext")

_PROBES = ("Doc 1(Title: Ada Lovelace) Ada Lovelace was born in London.\nDoc 2(Title: X) y, z!\n",
           "\n\n<information>", "</information>\n\n", "<think> a b </think>\n<search> who? </search>",
           "  héllo\twörld  ’quotes’ 123 ", "")


class TextCodec:
    """`encode(text, special)` and `decode(ids)` as `tokenizer(text, add_special_tokens=special)
    ["input_ids"]` and `tokenizer.decode(ids, skip_special_tokens=False)` give them."""

    def __init__(self, tokenizer, backend: bool = True):
        """backend=False: always the wrapper (no probing, for a caller that encodes once)."""
        self.tok = tokenizer
        self.backend = _plain_backend(tokenizer) if backend else None

    def encode(self, text: str, special: bool) -> list[int]:
        if self.backend is not None:
            return self.backend.encode(text, add_special_tokens=special).ids
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        if self.backend is not None:
            return self.backend.decode(ids, skip_special_tokens=False)
        return self.tok.decode(ids, skip_special_tokens=False)


def _plain_backend(tok):
    """The tokenizer's `tokenizers.Tokenizer` when calling it directly is exact, else None."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: keep the wrapper
        return None
    cls, be = type(tok), getattr(tok, "_tokenizer", None)
    if not isinstance(tok, TokenizersBackend) or be is None:
        return None
    same_steps = (cls.__call__ is PreTrainedTokenizerBase.__call__ and cls.decode is PreTrainedTokenizerBase.decode
                  and cls._encode_plus is TokenizersBackend._encode_plus and cls._decode is TokenizersBackend._decode)
    plain = (be.truncation is None and be.padding is None and not tok.clean_up_tokenization_spaces
             and be.encode_special_tokens == bool(tok.split_special_tokens))
    if not (same_steps and plain):
        return None
    probes = _PROBES + tuple(str(t) for t in tok.all_special_tokens)
    for text in probes:
        for special in (False, True):
            ids = list(tok(text, add_special_tokens=special)["input_ids"])
            if be.encode(text, add_special_tokens=special).ids != ids:
                log.info("tokenizer backend differs from its wrapper on %r: encoding through the wrapper", text)
                return None
            if be.decode(ids, skip_special_tokens=False) != tok.decode(ids, skip_special_tokens=False):
                log.info("tokenizer backend decodes %r differently: decoding through the wrapper", text)
                return None
    return be
