"""Offline evaluation: leave-one-out HR@10 and NDCG@10, against popularity.

Each user with at least two items keeps their latest interaction out of
training; a model is scored on ranking that item among all items the user has
not interacted with in training. The same split ranks items by popularity as
the baseline. Also: synthetic interactions with planted structure, and a reader
for MovieLens files.

`python -m aimesh_recommend.evaluation` trains a model on such a split and
prints both scores (`aimesh recommend eval` runs it).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aimesh_recommend.model import TrainingData

# (user, item, weight, time)
Event = tuple[str, str, float, float]
Scorer = Callable[[np.ndarray], torch.Tensor]  # user rows -> scores over all items


@dataclass
class Split:
    train: TrainingData
    held_users: np.ndarray  # rows in train.user_ids
    held_items: np.ndarray  # rows in train.item_ids


def leave_last_out(events: Iterable[Event]) -> Split:
    """Hold out each user's latest item (when they have another to learn from)."""
    by_user: dict[str, list[Event]] = {}
    for event in events:
        by_user.setdefault(event[0], []).append(event)
    train: list[tuple[str, str, float]] = []
    held: list[tuple[str, str]] = []
    for user, rows in by_user.items():
        rows.sort(key=lambda row: (row[3], row[1]))
        last = rows[-1][1]
        earlier = [row for row in rows if row[1] != last]
        if earlier:
            held.append((user, last))
            train.extend((row[0], row[1], row[2]) for row in earlier)
        else:
            train.extend((row[0], row[1], row[2]) for row in rows)
    data = TrainingData.from_triples(train)
    users = {name: row for row, name in enumerate(data.user_ids)}
    items = {name: row for row, name in enumerate(data.item_ids)}
    # A held-out item never seen in training cannot be ranked by anyone: left out.
    kept = [(users[u], items[i]) for u, i in held if i in items]
    pairs = np.array(kept, dtype=np.int64).reshape(-1, 2)
    return Split(data, pairs[:, 0].copy(), pairs[:, 1].copy())


def ranking_metrics(split: Split, score: Scorer, k: int = 10) -> dict[str, float]:
    """HR@k and NDCG@k of the held-out items, training items masked out."""
    data = split.train
    order = np.argsort(data.users, kind="stable")
    bounds = np.searchsorted(data.users[order], np.arange(len(data.user_ids) + 1))
    seen_items = data.items[order]
    hits = 0.0
    gains = 0.0
    for start in range(0, len(split.held_users), 512):
        users = split.held_users[start : start + 512]
        targets = torch.from_numpy(split.held_items[start : start + 512])
        scores = score(users).float().cpu().clone()
        lengths = bounds[users + 1] - bounds[users]
        rows = np.repeat(np.arange(len(users)), lengths)
        cols = np.concatenate([seen_items[bounds[u] : bounds[u + 1]] for u in users])
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -math.inf
        target_scores = scores.gather(1, targets.unsqueeze(1))
        rank = (scores > target_scores).sum(1)  # 0 = best
        hit = rank < k
        hits += float(hit.sum())
        gains += float((hit.float() / torch.log2(rank.float() + 2)).sum())
    count = max(len(split.held_users), 1)
    return {f"hr_at_{k}": hits / count, f"ndcg_at_{k}": gains / count}


def popularity_scorer(data: TrainingData) -> Scorer:
    counts = torch.from_numpy(np.bincount(data.items, minlength=len(data.item_ids))).float()

    def score(users: np.ndarray) -> torch.Tensor:
        return counts.expand(len(users), -1)

    return score


def planted(
    users: int = 600,
    items: int = 400,
    groups: int = 8,
    per_user: int = 20,
    in_group: float = 0.8,
    seed: int = 0,
) -> list[Event]:
    """Users and items in latent groups: a user mostly picks items of their own group,
    and within any group popular items are picked more (Zipf), so popularity is a real
    baseline and only a model that finds the groups beats it."""
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, groups, users)
    item_group = rng.integers(0, groups, items)
    appeal = 1.0 / np.arange(1, items + 1) ** 0.8
    rng.shuffle(appeal)
    events: list[Event] = []
    for user in range(users):
        own = item_group == user_group[user]
        weights = appeal * np.where(own, in_group / max(own.sum(), 1), 0.0)
        weights += appeal * np.where(own, 0.0, (1 - in_group) / max((~own).sum(), 1))
        weights /= weights.sum()
        chosen = rng.choice(items, size=per_user, replace=False, p=weights)
        for step, item in enumerate(chosen):
            events.append((f"u{user}", f"i{item}", 1.0, float(step)))
    return events


def read_movielens(path: Path) -> list[Event]:
    """user, item, rating, timestamp: `::`-separated (ml-1m), tab-separated (ml-100k)
    or CSV with a header (ml-latest)."""
    events: list[Event] = []
    with path.open(encoding="latin-1") as source:
        first = source.readline()
        source.seek(0)
        if "::" in first:
            rows: Iterable[list[str]] = (line.rstrip("\n").split("::") for line in source)
        elif "\t" in first:
            rows = (line.rstrip("\n").split("\t") for line in source)
        else:
            reader = csv.reader(source)
            if not first.split(",")[0].strip().isdigit():
                next(reader)
            rows = reader
        for number, row in enumerate(rows, 1):
            if not row or not row[0]:
                continue
            try:
                user, item, rating, stamp = row[0], row[1], float(row[2]), float(row[3])
            except (IndexError, ValueError):
                raise ValueError(
                    f"{path}:{number}: expected user, item, rating, timestamp"
                ) from None
            events.append((f"u{user}", f"i{item}", rating, stamp))
    return events


BAR_WIDTH = 30


def _bar(fraction: float, note: str) -> str:
    filled = round(BAR_WIDTH * min(max(fraction, 0.0), 1.0))
    return f"\r[{'#' * filled}{' ' * (BAR_WIDTH - filled)}] {fraction * 100:5.1f}%  {note}"


def main(argv: list[str] | None = None) -> int:
    """Train on a leave-last-out split and print HR@10 and NDCG@10 against popularity."""
    parser = argparse.ArgumentParser(
        prog="python -m aimesh_recommend.evaluation",
        description="HR@10 and NDCG@10 vs popularity on held-out data, offline",
    )
    parser.add_argument(
        "--file", type=Path, help="MovieLens ratings (ratings.dat, u.data or ratings.csv)"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dimension", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Imported here: training imports this module.
    from aimesh_recommend import model
    from aimesh_recommend.training import evaluate

    if args.file is not None:
        try:
            events = read_movielens(args.file)
        except (OSError, ValueError) as error:
            print(f"aimesh: {error}", file=sys.stderr)
            return 2
        source = str(args.file)
    else:
        events = planted(seed=args.seed)
        source = "synthetic interactions with planted user and item groups"
    split = leave_last_out(events)
    data = split.train
    print(
        f"{source}: {len(events)} interactions, {len(data.user_ids)} users, "
        f"{len(data.item_ids)} items; {len(split.held_users)} held out (each user's latest)"
    )
    device = model.pick_device(args.device)
    options = model.TrainingOptions(dimension=args.dimension, epochs=args.epochs, seed=args.seed)
    started = time.perf_counter()

    def progress(done: int, loss: float) -> None:
        print(
            _bar(done / options.epochs, f"epoch {done}/{options.epochs}, loss {loss:.4f}"),
            end="",
            file=sys.stderr,
            flush=True,
        )

    trained = model.train(data, options, device, progress)
    print(file=sys.stderr)
    metrics = evaluate(trained, split, device)
    print(f"trained on {device} in {time.perf_counter() - started:.1f} s")
    print(f"{'':<12}{'HR@10':>8}{'NDCG@10':>10}")
    print(f"{'model':<12}{metrics['hr_at_10']:>8.4f}{metrics['ndcg_at_10']:>10.4f}")
    print(
        f"{'popularity':<12}{metrics['popularity_hr_at_10']:>8.4f}"
        f"{metrics['popularity_ndcg_at_10']:>10.4f}"
    )
    ratio = metrics["hr_at_10"] / max(metrics["popularity_hr_at_10"], 1e-12)
    print(f"HR@10 is {ratio:.2f}x popularity's")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: training imports
    # aimesh_recommend.evaluation, and both should see the same classes.
    from aimesh_recommend.evaluation import main as evaluation_main

    sys.exit(evaluation_main())
