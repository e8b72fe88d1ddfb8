"""Scoring in a child process (aimesh_runtime.child_process), so its Python
never waits on the event loop's GIL.

The child holds the model's tensors and runs the same `top_items` as
in-process scoring. Messages: the weights of a model once ("model", one-way),
its biases again after a catalogue change ("bias", one-way), and batches
("score"), each answered by ("ok", scores, item rows). A child that dies or
stops answering fails its batch (the model breaker and the fallback take it)
and is started again for the next, which resends the model.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

from aimesh_recommend.scoring import (
    MAX_K,
    Ranked,
    ScoreRequest,
    ServingModel,
    ranked_lists,
)
from aimesh_runtime.child_process import ChildFailed, ChildProcess, Message, detach, serve

MODELS_KEPT = 4  # versions the child holds: the served one and any batch still on an old one
ScoringFailed = ChildFailed  # the scoring process failed or stopped answering


class ScoringProcess(ChildProcess):
    """The parent side, on the event loop: `score_batch` is the batcher's
    remote lane (one batch at a time; the loop waits on the pipe, no thread)."""

    def __init__(self, torch_threads: int, timeout_s: float = 30.0) -> None:
        super().__init__(
            "aimesh_recommend.scoring_process",
            str(torch_threads),
            name="scoring",
            timeout_s=timeout_s,
            on_start=self._forget,
        )
        # Per model: its key in the child and the bias version the child holds.
        self._sent: weakref.WeakKeyDictionary[ServingModel, tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._keys = itertools.count(1)

    def _forget(self) -> None:
        self._sent = weakref.WeakKeyDictionary()

    async def score_batch(self, requests: Sequence[ScoreRequest]) -> list[Ranked]:
        """Rankings in order, one round trip per model the requests name."""
        results: list[Ranked] = [Ranked([], [])] * len(requests)
        groups: dict[int, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(id(request.model), []).append(position)
        for positions in groups.values():
            group = [requests[p] for p in positions]
            for position, ranked in zip(
                positions, await self._score(group[0].model, group), strict=True
            ):
                results[position] = ranked
        return results

    async def _score(self, model: ServingModel, requests: list[ScoreRequest]) -> list[Ranked]:
        rows = np.fromiter((r.user_row for r in requests), np.int64, len(requests))
        counts = np.fromiter((len(r.exclude) for r in requests), np.int64, len(requests))
        columns = np.fromiter(itertools.chain.from_iterable(r.exclude for r in requests), np.int64)
        positions = np.repeat(np.arange(len(requests), dtype=np.int64), counts)

        def messages() -> list[Message]:
            key, state = self._publish(model)
            return [*state, ("score", key, rows, positions, columns, MAX_K)]

        reply = await self.ask(messages)
        return ranked_lists(reply[1], reply[2])

    def _publish(self, model: ServingModel) -> tuple[int, list[Message]]:
        """The model's key in the child, and its weights, or its biases after a
        catalogue change, when the child lacks them."""
        version = model.bias_version
        sent = self._sent.get(model)
        state: list[Message] = []
        if sent is None:
            key = next(self._keys)
            state.append(
                (
                    "model",
                    key,
                    model.users.cpu().numpy(),
                    model.items.cpu().numpy(),
                    model.scoring_bias.cpu().numpy(),
                )
            )
        else:
            key = sent[0]
            if sent[1] != version:
                state.append(("bias", key, model.scoring_bias.cpu().numpy()))
        self._sent[model] = (key, version)
        return key, state


def main() -> None:
    detach()
    import torch

    from aimesh_recommend.scoring import top_items

    torch_threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    if torch_threads:
        torch.set_num_threads(torch_threads)
    models: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def handle(message: Message) -> Sequence[Any] | None:
        kind, key = message[0], message[1]
        if kind == "model":
            users, items, bias = (torch.from_numpy(np.array(a)) for a in message[2:5])
            models[key] = (users, items, bias)
            while len(models) > MODELS_KEPT:
                del models[next(iter(models))]
        elif kind == "bias":
            users, items, _ = models[key]
            models[key] = (users, items, torch.from_numpy(np.array(message[2])))
        elif kind == "score":
            rows, positions, columns, k = message[2:6]
            if key not in models:
                raise KeyError(f"model {key} is not loaded")
            users, items, bias = models[key]
            excluded = (
                torch.from_numpy(np.stack([positions, columns], axis=1)) if len(columns) else None
            )
            values, indices = top_items(users, items, bias, torch.from_numpy(rows), excluded, k)
            return values.numpy(), indices.numpy()
        else:
            raise ValueError(f"unknown message {kind!r}")
        return None

    serve(handle, one_way=("model", "bias"))


if __name__ == "__main__":
    main()
