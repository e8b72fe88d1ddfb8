"""scripts/gpu-check search: the search service's GPU paths, on a machine with a GPU.

  encoder sentences/s on CUDA at batch 256 (goal: 40,000 or more): fp16 through
  sentence-transformers' encode and through the encoder's direct tokenizer, the
  latter padded in the CPU's groups of 16 and as one group; fp32 as one group;
  and fp16 in batches of 1 to 64 as the service's micro-batcher forms them
  FAISS GPU flat search QPS on 1M x 384 vectors, batched and single (goal: 30,000
  batched); where faiss has no GPU support (faiss-cpu), the same exact top-10 as
  a torch matrix product + topk on the GPU, labelled as such: it bounds what a
  flat GPU index can do there, it is not the service's path
  the service benchmark (batching on/off) with the encoder on CUDA, where the
  service's own dependencies (PostgreSQL, faiss, asyncpg) are installed

The model comes from AIMESH_SEARCH_MODEL_PATH, else the packaged one. On a
machine without CUDA it says so and stops: CI has none, and the CPU paths are
what the tests cover. `--cpu-smoke` runs every step on the CPU at a tiny size
and in fp32 (fp16 on a CPU is only slower), to check the script before spending
GPU time. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "services"))

from aimesh_search.encoder import PAD_GROUP, Encoder
from tests.load.corpus import passages


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def encoder_rate(
    texts: list[str], device: str, *, fp16: bool, group: int, library: bool = False
) -> float:
    encoder = Encoder(os.environ.get("AIMESH_SEARCH_MODEL_PATH", ""), "all-MiniLM-L6-v2", device)
    if fp16 and device == "cuda":  # fp16 on a CPU is only slower: the smoke run keeps fp32
        encoder._model.half()
    else:
        encoder._model.float()
    encode = encoder.encode_with_library if library else encoder.encode
    encode(texts[:256], batch_size=group)  # warm up kernels
    synchronize(device)
    started = time.perf_counter()
    for start in range(0, len(texts), 256):
        encode(texts[start : start + 256], batch_size=group)
    synchronize(device)
    return len(texts) / (time.perf_counter() - started)


def micro_batch_rate(texts: list[str], device: str) -> float:
    """fp16 on the direct path, in batches of 1 to 64 texts as the service's
    micro-batcher forms them: each batch a new tensor shape."""
    encoder = Encoder(os.environ.get("AIMESH_SEARCH_MODEL_PATH", ""), "all-MiniLM-L6-v2", device)
    if device == "cuda":
        encoder._model.half()
    encoder.encode(texts[:64])
    synchronize(device)
    sizes, done, started = np.random.default_rng(0), 0, time.perf_counter()
    while done < len(texts):
        size = int(sizes.integers(1, 65))
        encoder.encode(texts[done : done + size])
        done += size
    synchronize(device)
    return len(texts) / (time.perf_counter() - started)


def unit_rows(count: int, dimension: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((count, dimension), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    return base, base[rng.choice(count, min(count, 10_000), replace=False)]


def faiss_gpu_rates(faiss: Any, base: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    resources = faiss.StandardGpuResources()
    index = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(base.shape[1]))
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


def torch_flat_rates(base: np.ndarray, queries: np.ndarray, device: str) -> dict[str, float]:
    """Exact inner-product top-10 as one matrix product and topk per chunk of
    queries (the arithmetic of a flat GPU index), results copied to the host."""
    import torch

    vectors = torch.from_numpy(base).to(device)
    chunk = 1000  # 1000 x 1M fp32 scores = 4 GB, well inside an H200

    def search(rows: np.ndarray) -> None:
        for start in range(0, len(rows), chunk):
            scores = torch.from_numpy(rows[start : start + chunk]).to(device) @ vectors.T
            torch.topk(scores, 10, dim=1).indices.cpu()

    search(queries[:100])
    started = time.perf_counter()
    search(queries)
    batched = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    singles = min(1000, len(queries))
    for row in range(singles):
        search(queries[row : row + 1])
    single = singles / (time.perf_counter() - started)
    return {"torch_flat_batched_qps": batched, "torch_flat_single_qps": single}


def flat_search_rates(count: int, device: str) -> dict[str, float]:
    base, queries = unit_rows(count, 384)
    try:
        faiss: Any = importlib.import_module("faiss")
    except ImportError:
        faiss = None
    if faiss is not None and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        rates = faiss_gpu_rates(faiss, base, queries)
        print(
            f"  faiss GPU on {count} x 384: batched {rates['faiss_batched_qps']:.0f} q/s,"
            f" single {rates['faiss_single_qps']:.0f} q/s"
        )
        return rates
    print("  faiss with GPU support is not installed here: FAISS GPU figures owed;")
    rates = torch_flat_rates(base, queries, device)
    print(
        f"  exact top-10 as a torch product on {device}, {count} x 384 (not the service's path):"
        f" batched {rates['torch_flat_batched_qps']:.0f} q/s,"
        f" single {rates['torch_flat_single_qps']:.0f} q/s"
    )
    return rates


def service_figures(device: str) -> dict[str, object]:
    try:
        for needed in ("asyncpg", "faiss", "pgserver"):
            importlib.import_module(needed)
    except ImportError as missing:
        print(f"  service benchmark on {device} skipped: {missing.name} is not installed here")
        return {}
    from tests.load.bench_search import measure_batching

    os.environ["AIMESH_SEARCH_DEVICE"] = device
    corpus = passages(60_000, max_chars=80)
    queries = [" ".join(text.split()[:6]) for text in corpus]
    service = asyncio.run(measure_batching(4, 6.0, corpus, queries))
    return {f"service_{k}": v if isinstance(v, dict) else round(v, 3) for k, v in service.items()}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every step on the CPU, tiny")
    args = parser.parse_args()
    if args.cpu_smoke:
        device, texts, vectors = "cpu", passages(300)[:64], 20_000
        figures: dict[str, object] = {"bench": "gpu-check-search", "gpu": "cpu smoke run"}
    elif torch.cuda.is_available():
        device, texts, vectors = "cuda", passages(51_200)[:51_200], 1_000_000
        figures = {"bench": "gpu-check-search", "gpu": torch.cuda.get_device_name(0)}
    else:
        print("no CUDA device here: the GPU figures are still owed (run this on a GPU machine)")
        print(json.dumps({"bench": "gpu-check-search", "gpu": False}))
        return
    print(f"torch {torch.__version__}, {len(texts)} passages", flush=True)
    quarter = texts[: len(texts) // 4]
    runs = {  # key: texts, fp16, padding group, through sentence-transformers' encode
        "encoder_fp16_library_per_s": (quarter, True, 256, True),
        f"encoder_fp16_group{PAD_GROUP}_per_s": (quarter, True, PAD_GROUP, False),
        "encoder_fp16_per_s": (texts, True, 256, False),
        "encoder_fp32_per_s": (texts, False, 256, False),
    }
    for key, (sample, fp16, group, library) in runs.items():
        figures[key] = round(encoder_rate(sample, device, fp16=fp16, group=group, library=library))
        path = "library tokenizer" if library else "direct tokenizer"
        precision = "fp16" if fp16 else "fp32"
        print(f"  encoder at batch 256, {precision}, {path}, padded in groups of {group}:"
              f" {figures[key]}/s", flush=True)  # fmt: skip
    figures["encoder_fp16_batches_1_to_64_per_s"] = round(micro_batch_rate(quarter, device))
    print("  encoder in batches of 1 to 64, fp16, direct tokenizer, the device's pad group:"
          f" {figures['encoder_fp16_batches_1_to_64_per_s']}/s", flush=True)  # fmt: skip
    figures.update({k: round(v) for k, v in flat_search_rates(vectors, device).items()})
    if not args.cpu_smoke:
        figures.update(service_figures(device))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
