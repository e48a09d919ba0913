"""TextCodec: the rollout loop's encode and decode through the tokenizer's backend give exactly the
Hugging Face wrapper's ids and text, and anything the wrapper would change goes through it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from actors.tokentext import TextCodec

PIECES = list("abcXYZ 019.,!?()'\n\té’中") + ["<think>", "</search>", "<answer>", "<information>", "<|eos|>",
                                             "Doc 1(Title: "]
TEXT = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The demo's reloaded tokenizer: a byte-level BPE with the rollout's tags as special tokens."""
    from transformers import AutoTokenizer

    from demo.teach import script_texts
    from demo.tinymodel import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(script_texts(), out, vocab_size=512)
    return AutoTokenizer.from_pretrained(str(out))


@pytest.fixture(scope="module")
def codec(tok):
    c = TextCodec(tok)
    assert c.backend is not None, "the demo's tokenizer is a plain backend: the fast path is taken"
    return c


@settings(max_examples=300, deadline=None)
@given(text=TEXT, special=st.booleans())
def test_backend_encodes_and_decodes_as_the_wrapper(tok, codec, text, special):
    ids = list(tok(text, add_special_tokens=special)["input_ids"])
    assert codec.encode(text, special) == ids
    assert codec.decode(ids) == tok.decode(ids, skip_special_tokens=False)


def test_anything_the_wrapper_would_change_goes_through_it(tok):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    text = "Doc 1(Title: x) the capital of zorland is mirabel . " * 4
    want = list(tok(text, add_special_tokens=False)["input_ids"])

    tok.backend_tokenizer.enable_truncation(max_length=5)  # the wrapper turns it off for its own call
    try:
        c = TextCodec(tok)
        assert c.backend is None and c.encode(text, False) == want
    finally:
        tok.backend_tokenizer.no_truncation()

    tok.clean_up_tokenization_spaces = True
    try:
        assert TextCodec(tok).backend is None
    finally:
        tok.clean_up_tokenization_spaces = False

    class Custom(type(tok)):  # a tokenizer class with its own encode step
        def _encode_plus(self, text, *a, **kw):
            return TokenizersBackend._encode_plus(self, text.upper() if isinstance(text, str) else text, *a, **kw)

    tok.__class__ = Custom
    try:
        c = TextCodec(tok)
        assert c.backend is None and c.encode(text, False) == list(tok(text, add_special_tokens=False)["input_ids"])
    finally:
        tok.__class__ = Custom.__mro__[1]
    assert TextCodec(tok).backend is not None


def test_special_tokens_are_added_as_the_wrapper_adds_them(tok):
    """A tokenizer whose post-processor adds a BOS (as Llama's does): encode(special=True) has it,
    encode(special=False) has not, both as the wrapper gives them."""
    from tokenizers.processors import TemplateProcessing

    be, bos = tok.backend_tokenizer, tok.bos_token
    saved = be.post_processor
    be.post_processor = TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    try:
        c = TextCodec(tok)
        assert c.backend is not None
        for special in (True, False):
            ids = c.encode("who wrote it ?", special)
            assert ids == list(tok("who wrote it ?", add_special_tokens=special)["input_ids"])
            assert (ids[0] == tok.bos_token_id) == special
    finally:
        be.post_processor = saved
