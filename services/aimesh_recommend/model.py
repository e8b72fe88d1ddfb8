"""The model: matrix factorisation trained with a BPR loss, in Torch.

score(user, item) = <p_user, q_item> + b_item. BPR pushes an item the user
interacted with above a random other one, which suits implicit feedback (views,
clicks, purchases) better than regressing on the weights. The item vectors q
also serve SimilarItems (cosine).

Artifacts are state dicts of plain tensors, written with torch.save and read
with weights_only=True, so loading one cannot run code.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

Progress = Callable[[int, float], None]  # (epochs done, mean loss of the last epoch)


class Cancelled(Exception):
    """Training stopped because it was asked to."""


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class MatrixFactorization(nn.Module):
    def __init__(self, users: int, items: int, dimension: int) -> None:
        super().__init__()
        self.user = nn.Embedding(users, dimension)
        self.item = nn.Embedding(items, dimension)
        self.item_bias = nn.Embedding(items, 1)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.user(users) * self.item(items)).sum(-1)
        scores: torch.Tensor = dot + self.item_bias(items).squeeze(-1)
        return scores


@dataclass
class TrainingData:
    """Interactions as index arrays, one row per distinct (user, item) pair."""

    user_ids: list[str]
    item_ids: list[str]
    users: np.ndarray  # int64 row of user_ids
    items: np.ndarray  # int64 row of item_ids
    weights: np.ndarray  # float32, summed over repeats of the pair

    @classmethod
    def from_triples(cls, triples: list[tuple[str, str, float]]) -> TrainingData:
        user_index: dict[str, int] = {}
        item_index: dict[str, int] = {}
        pairs: dict[tuple[int, int], float] = {}
        for user, item, weight in triples:
            u = user_index.setdefault(user, len(user_index))
            i = item_index.setdefault(item, len(item_index))
            pairs[(u, i)] = pairs.get((u, i), 0.0) + weight
        keys = np.array(list(pairs), dtype=np.int64).reshape(-1, 2)
        return cls(
            list(user_index),
            list(item_index),
            keys[:, 0].copy(),
            keys[:, 1].copy(),
            np.array(list(pairs.values()), dtype=np.float32),
        )

    def __len__(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class TrainingOptions:
    dimension: int = 32
    epochs: int = 20
    batch_size: int = 1024
    learning_rate: float = 0.01
    l2: float = 1e-2
    seed: int = 0


def train(
    data: TrainingData,
    options: TrainingOptions,
    device: torch.device,
    on_epoch: Progress | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> MatrixFactorization:
    """Fit a model; raises Cancelled as soon as should_stop() says so."""
    generator = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)
    model = MatrixFactorization(len(data.user_ids), len(data.item_ids), options.dimension)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.learning_rate)
    users = torch.from_numpy(data.users).to(device)
    items = torch.from_numpy(data.items).to(device)
    # A purchase or a high rating counts more than a view, but sub-linearly.
    weights = torch.from_numpy(np.log1p(data.weights) / math.log(2.0)).to(device)
    count, item_count = len(data), len(data.item_ids)
    for epoch in range(options.epochs):
        order = torch.randperm(count, generator=generator).to(device)
        total = 0.0
        for start in range(0, count, options.batch_size):
            if should_stop():
                raise Cancelled()
            batch = order[start : start + options.batch_size]
            u, i = users[batch], items[batch]
            j = torch.randint(0, item_count, (len(batch),), generator=generator).to(device)
            margin = model(u, i) - model(u, j)
            loss = -(nn.functional.logsigmoid(margin) * weights[batch]).mean()
            penalty = (
                model.user(u).pow(2).sum() + model.item(i).pow(2).sum() + model.item(j).pow(2).sum()
            ) / len(batch)
            optimizer.zero_grad(set_to_none=True)
            (loss + options.l2 * penalty).backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        if on_epoch is not None:
            on_epoch(epoch + 1, total / max(count, 1))
    return model


def to_bytes(model: MatrixFactorization) -> bytes:
    buffer = io.BytesIO()
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    torch.save(state, buffer)
    return buffer.getvalue()


def from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    """The tensors of an artifact; weights_only refuses anything but tensors and containers."""
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    expected = {"user.weight", "item.weight", "item_bias.weight"}
    if not isinstance(state, dict) or set(state) != expected:
        raise ValueError("artifact is not a matrix-factorisation state dict")
    return {key: value.float() for key, value in state.items()}
