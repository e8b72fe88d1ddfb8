"""scripts/gpu-check recommend: the recommend model on CUDA against CPU, in one run.

  epoch_s            seconds for one training epoch (BPR, batch 1024) of
                     synthetic interactions, on CUDA and on CPU;
  serving_qps        users scored per second (matmul over every item, seen
                     items masked, top-100) at batch 64, on CUDA and on CPU.
On a machine without CUDA it says the GPU figures are owed and stops: CI has
none, and the CPU path is what the tests cover. `--cpu-smoke` runs the CPU side
alone at a tiny size, to check the script before spending GPU time. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "services"))

from aimesh_recommend import model as mf
from aimesh_recommend.scoring import MAX_K, ScoreRequest, ServingModel

USERS, ITEMS, PER_USER, DIMENSION, BATCH = 50_000, 200_000, 40, 64, 64


def data(users_count: int = USERS, items_count: int = ITEMS) -> mf.TrainingData:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(users_count), PER_USER)
    items = rng.integers(0, items_count, len(users))
    triples = [(f"u{u}", f"i{i}", 1.0) for u, i in zip(users, items, strict=True)]
    return mf.TrainingData.from_triples(triples)


def epoch_seconds(training: mf.TrainingData, device: torch.device) -> float:
    options = mf.TrainingOptions(dimension=DIMENSION, epochs=1)
    warm_up = mf.TrainingData(
        training.user_ids, training.item_ids, training.users[:20_000],
        training.items[:20_000], training.weights[:20_000],
    )  # fmt: skip
    mf.train(warm_up, options, device)  # kernels and allocator, on the full tables
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    mf.train(training, options, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def serving_qps(training: mf.TrainingData, device: torch.device, seconds: float = 5.0) -> float:
    model = mf.MatrixFactorization(len(training.user_ids), len(training.item_ids), DIMENSION)
    pairs = list(
        zip(
            [training.user_ids[u] for u in training.users],
            [training.item_ids[i] for i in training.items],
            strict=True,
        )
    )
    state = mf.from_bytes(mf.to_bytes(model))
    serving = ServingModel("v1", state, training.user_ids, training.item_ids, pairs, device)
    done, position = 0, 0
    serving.score([ScoreRequest(serving, r, ()) for r in range(BATCH)], MAX_K)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        rows = [(position + n) % len(training.user_ids) for n in range(BATCH)]
        position += BATCH
        requests = [ScoreRequest(serving, r, tuple(serving.seen.get(r, ()))) for r in rows]
        serving.score(requests, MAX_K)  # returns lists on the host: synchronised
        done += BATCH
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the CPU side alone, tiny")
    args = parser.parse_args()
    if args.cpu_smoke:
        devices, gpu, training = ("cpu",), "cpu smoke run", data(500, 2_000)
    elif torch.cuda.is_available():
        devices, gpu, training = ("cuda", "cpu"), torch.cuda.get_device_name(0), data()
    else:
        print("no CUDA device here: the GPU figures are still owed (run this on a GPU machine)")
        print(json.dumps({"bench": "gpu-check-recommend", "gpu": False}))
        return
    print(
        f"{len(training)} interactions, {len(training.user_ids)} users,"
        f" {len(training.item_ids)} items, {DIMENSION} dims"
    )
    figures: dict[str, object] = {"bench": "gpu-check-recommend", "gpu": gpu}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    for name in devices:
        device = torch.device(name)
        figures[f"epoch_s_{name}"] = round(epoch_seconds(training, device), 3)
        figures[f"serving_qps_{name}"] = round(serving_qps(training, device))
        print(
            f"  {name}: one epoch {figures[f'epoch_s_{name}']} s,"
            f" serving {figures[f'serving_qps_{name}']} users/s at batch {BATCH}",
            flush=True,
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
