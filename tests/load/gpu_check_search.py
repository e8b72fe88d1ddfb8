"""scripts/gpu-check search: the search service's GPU paths, on a machine with a GPU.

  encoder sentences/s at batch 256, fp16 and fp32 (goal: 40,000 or more)
  FAISS GPU flat search QPS on 1M x 384 vectors, batched and single (goal: 30,000 batched)
  the service benchmark (batching on/off) with the encoder on CUDA

Faiss on the GPU needs the faiss-gpu build installed in place of faiss-cpu. On a
machine without CUDA it says so and stops: CI has none, and the CPU paths are
what the tests cover. The last line is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aimesh_search.encoder import Encoder
from aimesh_search.index import faiss, gpu_count
from tests.load.corpus import passages


def encoder_rate(texts: list[str], fp16: bool) -> float:
    encoder = Encoder("", "all-MiniLM-L6-v2", "cuda")
    if not fp16:
        encoder._model.float()
    encoder.encode(texts[:256])  # warm up kernels
    started = time.perf_counter()
    for start in range(0, len(texts), 256):
        encoder.encode(texts[start : start + 256])
    import torch

    torch.cuda.synchronize()
    return len(texts) / (time.perf_counter() - started)


def faiss_rates(count: int = 1_000_000, dimension: int = 384) -> dict[str, float]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((count, dimension), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[rng.choice(count, 10_000, replace=False)]
    resources = faiss.StandardGpuResources()
    index = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(dimension))
    index.add(base)
    index.search(queries[:100], 10)
    started = time.perf_counter()
    index.search(queries, 10)
    batched = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    for row in range(1000):
        index.search(queries[row : row + 1], 10)
    single = 1000 / (time.perf_counter() - started)
    return {"faiss_batched_qps": batched, "faiss_single_qps": single}


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU figures are still owed (run this on a GPU machine)")
        print(json.dumps({"bench": "gpu-check-search", "gpu": False}))
        return
    texts = passages(51_200)[:51_200]
    figures: dict[str, object] = {"bench": "gpu-check-search", "gpu": torch.cuda.get_device_name(0)}
    figures["encoder_fp16_per_s"] = round(encoder_rate(texts, fp16=True))
    figures["encoder_fp32_per_s"] = round(encoder_rate(texts, fp16=False))
    print(
        f"  encoder at batch 256: fp16 {figures['encoder_fp16_per_s']}/s,"
        f" fp32 {figures['encoder_fp32_per_s']}/s"
    )
    if gpu_count() > 0:
        rates = faiss_rates()
        figures.update({k: round(v) for k, v in rates.items()})
        print(
            f"  faiss GPU on 1M x 384: batched {rates['faiss_batched_qps']:.0f} q/s,"
            f" single {rates['faiss_single_qps']:.0f} q/s"
        )
    else:
        print("  faiss has no GPU support here (install faiss-gpu): FAISS GPU figures owed")
    import os

    from tests.load.bench_search import measure_batching

    os.environ["AIMESH_SEARCH_DEVICE"] = "cuda"
    corpus = passages(60_000, max_chars=80)
    queries = [" ".join(text.split()[:6]) for text in corpus]
    service = asyncio.run(measure_batching(4, 6.0, corpus, queries))
    figures.update({f"service_{k}": round(v, 3) for k, v in service.items()})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
