"""The encoder's direct tokenizer path against sentence-transformers' own encode."""

from __future__ import annotations

import numpy as np
import pytest

from aimesh_search.encoder import DirectTokenizer, Encoder


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder("", "all-MiniLM-L6-v2", "cpu")


TEXTS = [
    "how do I reset my password",
    "  padded on both sides\n",
    "x",
    "",
    "ünïcödé text, テスト, and an emoji 🙂",
    "a long passage " * 200,  # far past the 256-token window
    "fresh bread from the bakery on the corner",
    "word " * 254,  # exactly at the window with [CLS] and [SEP]
    "word " * 255,  # one token past it
]


def test_the_direct_path_is_what_the_encoder_uses(encoder: Encoder) -> None:
    assert encoder._direct is not None


@pytest.mark.parametrize("group", [1, 3, 16])
def test_the_direct_path_embeds_and_flags_as_the_library_does(encoder: Encoder, group: int) -> None:
    direct = encoder.encode(TEXTS, batch_size=group)
    library = encoder.encode_with_library(TEXTS, batch_size=group)
    assert direct.vectors.shape == library.vectors.shape == (len(TEXTS), encoder.dimension)
    assert direct.vectors.dtype == np.float32
    np.testing.assert_allclose(direct.vectors, library.vectors, atol=1e-5)
    assert direct.truncated == library.truncated
    assert direct.truncated == [False, False, False, False, False, True, False, False, True]


def test_order_follows_the_input_not_the_length_sort(encoder: Encoder) -> None:
    forward = encoder.encode(TEXTS, batch_size=4).vectors
    backward = encoder.encode(TEXTS[::-1], batch_size=4).vectors
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-5)


def test_no_texts_is_an_empty_result(encoder: Encoder) -> None:
    encoded = encoder.encode([])
    assert encoded.vectors.shape == (0, encoder.dimension) and encoded.truncated == []


def test_a_lower_casing_model_falls_back_to_the_library(encoder: Encoder) -> None:
    first = encoder._model[0]
    saved = getattr(first, "do_lower_case", False)
    first.do_lower_case = True
    try:
        assert DirectTokenizer.for_model(encoder._model, encoder.max_tokens) is None
    finally:
        first.do_lower_case = saved
