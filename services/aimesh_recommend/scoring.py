"""A loaded model version, scoring users against every item.

Scoring is one fused matmul-and-add of the batch's user vectors with all item
vectors and the item biases (the bias of an item outside the catalogue is -inf,
so the catalogue costs no extra pass), then items each user has seen are set to
-inf, then top-k. Everything stays on the model's device (CUDA when present).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

MAX_K = 100  # RecommendRequest.k's limit: one top-k serves every k from the cache


@dataclass(frozen=True)
class ScoreRequest:
    model: ServingModel
    user_row: int
    exclude: tuple[int, ...]  # item rows to leave out (seen)


class Ranked(NamedTuple):
    """Items for one request, best first."""

    rows: list[int]  # item rows
    scores: list[float]


class ServingModel:
    def __init__(
        self,
        version: str,
        state: dict[str, torch.Tensor],
        user_ids: list[str],
        item_ids: list[str],
        seen_pairs: Sequence[tuple[str, str]],
        device: torch.device,
    ) -> None:
        self.version = version
        self.device = device
        self.user_ids = user_ids
        self.item_ids = item_ids
        self.user_index = {name: row for row, name in enumerate(user_ids)}
        self.item_index = {name: row for row, name in enumerate(item_ids)}
        self.users = state["user.weight"].to(device)
        self.items = state["item.weight"].to(device)
        self.bias = state["item_bias.weight"].squeeze(-1).to(device)
        self.item_units = torch.nn.functional.normalize(self.items, dim=1)
        seen: dict[int, list[int]] = {}
        for user, item in seen_pairs:
            u, i = self.user_index.get(user), self.item_index.get(item)
            if u is not None and i is not None:
                seen.setdefault(u, []).append(i)
        self.seen = seen
        # Items the catalogue holds; others are never recommended.
        self.active = torch.ones(len(item_ids), dtype=torch.bool, device=device)
        self._scoring_bias = self.bias.clone()  # -inf where not active
        self.bias_version = 0  # raised on each change, so a scoring process can follow

    def set_catalogue(self, names: set[str]) -> None:
        mask = np.fromiter((name in names for name in self.item_ids), bool, len(self.item_ids))
        active = torch.from_numpy(mask).to(self.device)
        self.active = active
        self._scoring_bias = self.bias.masked_fill(~active, -math.inf)
        self.bias_version += 1

    def set_active(self, name: str, active: bool) -> None:
        row = self.item_index.get(name)
        if row is not None:
            self.active[row] = active
            self._scoring_bias[row] = self.bias[row] if active else -math.inf
            self.bias_version += 1

    def add_seen(self, user: str, item: str) -> None:
        u, i = self.user_index.get(user), self.item_index.get(item)
        if u is not None and i is not None and i not in self.seen.setdefault(u, []):
            self.seen[u].append(i)

    @property
    def scoring_bias(self) -> torch.Tensor:
        """Item biases, -inf outside the catalogue; `bias_version` counts its changes."""
        return self._scoring_bias

    def score(self, requests: Sequence[ScoreRequest], k: int = MAX_K) -> list[Ranked]:
        """Top-k items for each request, as one batch."""
        rows = torch.tensor([r.user_row for r in requests], device=self.device)
        pairs = [(n, item) for n, r in enumerate(requests) for item in r.exclude]
        excluded = torch.tensor(pairs, device=self.device) if pairs else None
        values, indices = top_items(self.users, self.items, self._scoring_bias, rows, excluded, k)
        return _ranked(values, indices)

    def similar(self, item_row: int, k: int) -> Ranked:
        with torch.inference_mode():
            scores = self.item_units @ self.item_units[item_row]
            scores.masked_fill_(~self.active, -math.inf)
            scores[item_row] = -math.inf
            top = torch.topk(scores, min(k, scores.shape[0]))
        return _ranked(top.values.unsqueeze(0), top.indices.unsqueeze(0))[0]


def top_items(
    users: torch.Tensor,
    items: torch.Tensor,
    bias: torch.Tensor,
    rows: torch.Tensor,
    excluded: torch.Tensor | None,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and item rows of the top k items of each user row; `excluded` holds
    (position in `rows`, item row) pairs to leave out. The one scoring path, in
    this process or a scoring process."""
    with torch.inference_mode():
        scores = torch.addmm(bias, users[rows], items.T)
        if excluded is not None:
            scores[excluded[:, 0], excluded[:, 1]] = -math.inf
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return top.values, top.indices


def _ranked(values: torch.Tensor, indices: torch.Tensor) -> list[Ranked]:
    """Per row, the items scored above -inf (top-k sorts those last), as plain
    lists made in C: no Python object per item on the scoring thread."""
    return ranked_lists(values.cpu().numpy(), indices.cpu().numpy())


def ranked_lists(values: np.ndarray, indices: np.ndarray) -> list[Ranked]:
    """`_ranked` of arrays (as a scoring process returns them)."""
    kept = np.isfinite(values).sum(axis=1).tolist()
    values_list = values.tolist()
    indices_list = indices.tolist()
    return [Ranked(indices_list[n][:count], values_list[n][:count]) for n, count in enumerate(kept)]


def score_batch(requests: Sequence[ScoreRequest]) -> list[Ranked]:
    """The batcher's function when scoring runs in this process."""
    return by_model(requests, lambda model, group: model.score(group))


def by_model(
    requests: Sequence[ScoreRequest],
    score: Callable[[ServingModel, list[ScoreRequest]], list[Ranked]],
) -> list[Ranked]:
    """`score` run once per model the requests were made against (a reload
    between submit and run leaves a few on the old one), results in order."""
    results: list[Ranked | None] = [None] * len(requests)
    groups: dict[int, list[int]] = {}
    for position, request in enumerate(requests):
        groups.setdefault(id(request.model), []).append(position)
    for positions in groups.values():
        model = requests[positions[0]].model
        for position, ranked in zip(
            positions, score(model, [requests[p] for p in positions]), strict=True
        ):
            results[position] = ranked
    return [r if r is not None else Ranked([], []) for r in results]
