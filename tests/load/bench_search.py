"""scripts/bench search: the search service's batching, efficiency and index quality.

Side by side in one run (two search servers over the same database, one with
the micro-batcher on and one with it off, alternating rounds of load from one
client with 64 searches in flight, every query text distinct so the query
cache never answers):
  batch_gain_vs_ceiling
                    the service's gain from batching (QPS on ÷ off) ÷ the
                    encoder's own in-process gain between batch 1 and the mean
                    batch the service formed (best in-process encode+search
                    QPS at that batch ÷ at batch 1): how much of what batching
                    can give on this CPU the service turns into throughput.
                    (QPS on ÷ off alone is printed with the rounds.)
  batch_p99_ratio   p99 latency on ÷ off.
  feed_efficiency   service QPS (on) ÷ in-process encode+search QPS at the mean
                    batch size the service formed (read from its /metrics),
                    the better of one encoder copy on every core and the
                    service's layout (a copy per core, one torch thread each).
Then, on real embeddings of the standard library's docstrings:
  recall_at_10      recall@10 of the index the service deploys at this size
                    (HNSW) against exact search (IndexFlatIP), on held-out queries.
  ann_qps_ratio     single-query QPS of that index ÷ IndexFlatIP on the same vectors.
  corpus_size       vectors in that index.
The last line is one JSON object with those keys.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aimesh.search.v1 import search_service_pb2 as pb  # noqa: E402
from aimesh.search.v1 import search_service_pb2_grpc  # noqa: E402
from aimesh_cli import local  # noqa: E402
from aimesh_search.encoder import Encoder  # noqa: E402
from aimesh_search.index import VectorIndex, faiss  # noqa: E402
from tests.load.corpus import passages  # noqa: E402
from tests.load.servers import (  # noqa: E402
    histogram_buckets,
    mean_of_histogram,
    on_off_rounds,
    start_process,
    wait_serving,
)

IN_FLIGHT = 64


async def load_round(
    port: int, token: str, queries: list[str], seconds: float
) -> tuple[float, list[float]]:
    """Closed loop, IN_FLIGHT concurrent searches for `seconds`; (qps, latencies)."""
    latencies: list[float] = []
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        search = search_service_pb2_grpc.SearchServiceStub(channel)
        stop_at = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < stop_at and queries:
                request = pb.SearchRequest(
                    parent="collections/bench", query=queries.pop(), top_k=10
                )
                started = time.perf_counter()
                await search.Search(request, metadata=metadata, timeout=30)
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        elapsed = time.monotonic() - started
    if not queries:
        raise RuntimeError("ran out of distinct queries; lower --seconds")
    return len(latencies) / elapsed, latencies


def raw_qps(
    encoders: list[Encoder], index: VectorIndex, texts: list[str], batch: int, seconds: float
) -> float:
    """In-process encode + search of `batch` queries at a time, one stream per
    encoder copy, each on its own thread: the ceiling for the service."""
    position = 0
    lock = threading.Lock()
    done = [0]
    stop_at = time.perf_counter() + seconds

    def stream(encoder: Encoder) -> None:
        nonlocal position
        faiss.omp_set_num_threads(1)  # as the service's index thread (AIMESH_SEARCH_FAISS_THREADS)
        while time.perf_counter() < stop_at:
            with lock:
                chunk = texts[position : position + batch]
                position += batch
            vectors = encoder.encode(chunk).vectors
            index._search(vectors, 10, None)
            with lock:
                done[0] += len(chunk)

    started = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(encoder,)) for encoder in encoders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.perf_counter() - started)


def best_raw_qps(
    documents: list[str], texts: list[str], batches: list[int], seconds: float
) -> dict[int, float]:
    """Per batch size, the better of the two ways to run the model in-process
    on this CPU: one copy with every core, or the service's layout (one copy
    per core, one torch thread each). The service is held to whichever is faster."""
    cores = len(os.sched_getaffinity(0))
    encoders = [Encoder("", "all-MiniLM-L6-v2", "cpu") for _ in range(min(cores, 4))]
    index = VectorIndex(encoders[0].dimension, ann_threshold=20_000, ef_search=64)
    index.load(np.arange(len(documents), dtype=np.int64), encoders[0].encode(documents).vectors)
    best = {}
    for batch in batches:
        torch.set_num_threads(cores)
        one_copy = raw_qps(encoders[:1], index, texts[: len(texts) // 2], batch, seconds)
        torch.set_num_threads(1)
        copies = raw_qps(encoders, index, texts[len(texts) // 2 :], batch, seconds)
        torch.set_num_threads(cores)
        print(
            f"  in-process encode+search at batch {batch}: one copy with {cores} threads"
            f" {one_copy:.0f} q/s, {len(encoders)} copies with one thread {copies:.0f} q/s"
        )
        best[batch] = max(one_copy, copies)
    return best


async def measure_batching(
    rounds: int, seconds: float, corpus: list[str], short_queries: list[str]
) -> dict[str, float]:
    os.environ["AIMESH_PORT_OFFSET"] = str(local.free_port_offset(5000))
    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-search-"))
    stored = local.load_secrets(folder)
    # Search queries are short: the first words of passages not in the collection.
    documents, queries = [text[:100] for text in corpus[:2000]], short_queries[2000:]
    with local.database_server(folder) as admin_url:
        urls = await local.provision(admin_url, stored["role_passwords"])
        env = local.service_environment(urls, stored, os.environ)
        env["AIMESH_RATE_LIMIT_RPS"] = "1000000"  # one principal drives all the load
        env["AIMESH_RATE_LIMIT_BURST"] = "1000000"
        user_port = local.grpc_port("user")
        ports = {"on": local.grpc_port("search"), "off": local.grpc_port("search") + 100}
        processes = [start_process("aimesh_user", env, user_port, folder / "user.log")]
        try:
            await wait_serving(user_port, processes[0])
            token = await local.login(
                f"127.0.0.1:{user_port}", stored["admin_email"], stored["admin_password"]
            )
            for mode, port in ports.items():  # "off" starts after the seed, so it loads it
                mode_env = {**env, "AIMESH_SEARCH_BATCHING": "true" if mode == "on" else "false"}
                processes.append(
                    start_process("aimesh_search", mode_env, port, folder / f"{mode}.log")
                )
                await wait_serving(port, processes[-1])
                if mode == "on":
                    await seed(port, token, documents)
            pool = list(reversed(queries))
            for port in ports.values():  # first calls pay one-time costs: not measured
                await load_round(port, token, pool, 1.0)
            summary = await on_off_rounds(
                ports, rounds, lambda port: load_round(port, token, pool, seconds)
            )
            batch = mean_of_histogram(ports["on"] + 1000, "aimesh_search_encoder_batch_size")
            batch_buckets = histogram_buckets(
                ports["on"] + 1000, "aimesh_search_encoder_batch_size"
            )
        finally:
            for process in processes:
                process.terminate()
                process.wait()
    (on_qps, on_p99), (off_qps, off_p99) = summary["on"], summary["off"]
    print(f"  mean batch formed by the service: {batch:.1f}")
    formed = max(1, round(batch))
    raw = best_raw_qps(documents, queries[-20000:], sorted({1, formed}), seconds)
    ceiling_gain = raw[formed] / raw[1]
    print(
        f"  gain from batching: service {on_qps / off_qps:.2f}x (on ÷ off),"
        f" encoder in-process {ceiling_gain:.2f}x (batch {formed} ÷ batch 1)"
    )
    return {
        "batch_gain_vs_ceiling": on_qps / off_qps / ceiling_gain,
        "batch_p99_ratio": on_p99 / off_p99,
        "feed_efficiency": on_qps / raw[formed],
        "batches": batch_buckets,
    }


async def seed(port: int, token: str, documents: list[str]) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        search = search_service_pb2_grpc.SearchServiceStub(channel)
        await search.CreateCollection(
            pb.CreateCollectionRequest(collection_id="bench", collection=pb.Collection()),
            metadata=metadata,
        )
        for start in range(0, len(documents), 256):
            await search.UpsertDocuments(
                pb.UpsertDocumentsRequest(
                    parent="collections/bench",
                    documents=[
                        pb.Document(name=f"collections/bench/documents/d{start + i}", text=text)
                        for i, text in enumerate(documents[start : start + 256])
                    ],
                ),
                metadata=metadata,
                timeout=120,
            )


def embeddings(texts: list[str], cache: Path) -> np.ndarray:
    """Embeddings of `texts`, cached on disk by their hash (encoding takes minutes)."""
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache / f"stdlib-{len(texts)}-{key}.npy"
    if path.exists():
        return np.load(path)
    encoder = Encoder("", "all-MiniLM-L6-v2", "cpu")
    started = time.perf_counter()
    step = 8192  # large calls let the model group texts of similar length
    vectors = np.vstack(
        [encoder.encode(texts[i : i + step], 64).vectors for i in range(0, len(texts), step)]
    )
    print(f"  encoded {len(texts)} passages in {time.perf_counter() - started:.0f} s")
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def measure_index(corpus: list[str], size: int, cache: Path) -> dict[str, float]:
    texts = corpus[: size + 1000]
    vectors = embeddings(texts, cache)
    base, queries = vectors[:size], vectors[size : size + 1000]
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    deployed = VectorIndex(
        base.shape[1], ann_threshold=20_000, ef_search=64
    )  # the service's defaults
    deployed.load(np.arange(size, dtype=np.int64), base)
    assert deployed.approximate, "the service deploys HNSW at this size"
    _, truth = exact.search(queries, 10)
    _, found = deployed._search(queries, 10, None)
    recall = float(np.mean([len(set(truth[i]) & set(found[i])) / 10 for i in range(len(queries))]))

    def single_query_qps(search: Any) -> float:
        started = time.perf_counter()
        for row in range(len(queries)):
            search(queries[row : row + 1])
        return len(queries) / (time.perf_counter() - started)

    flat_qps = single_query_qps(lambda q: exact.search(q, 10))
    ann_qps = single_query_qps(lambda q: deployed._search(q, 10, None))
    print(
        f"  {size} vectors: HNSW recall@10 {recall:.4f};"
        f" single-query {ann_qps:.0f} q/s vs flat {flat_qps:.0f} q/s"
    )
    return {"recall_at_10": recall, "ann_qps_ratio": ann_qps / flat_qps, "corpus_size": size}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating on/off rounds")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of load per round")
    parser.add_argument("--corpus-size", type=int, default=100_000)
    parser.add_argument("--cache", type=Path, default=ROOT / ".aimesh" / "bench-cache")
    parser.add_argument(
        "--batching-only",
        action="store_true",
        help="skip the index figures (their first run embeds the whole corpus)",
    )
    parser.add_argument("--plot", action="store_true", help="write PNGs into tests/load/plots")
    args = parser.parse_args()
    # Passages of up to 80 characters (about 20 tokens): a 2-core CPU embeds about
    # 5,000 tokens a second, so 100,000 longer passages would take an hour.
    corpus = passages(args.corpus_size + 1000, max_chars=80)
    short_queries = [" ".join(text.split()[:6]) for text in corpus]
    print(
        f"batching: {args.rounds} rounds of {args.seconds:.0f} s,"
        f" {IN_FLIGHT} in flight, distinct queries"
    )
    batching = await measure_batching(args.rounds, args.seconds, corpus, short_queries)
    result: dict[str, Any] = {
        "bench": "search",
        "batch_gain_vs_ceiling": round(batching["batch_gain_vs_ceiling"], 3),
        "batch_p99_ratio": round(batching["batch_p99_ratio"], 3),
        "feed_efficiency": round(batching["feed_efficiency"], 3),
    }
    if not args.batching_only:
        print("index: the deployed HNSW index against exact search")
        index = measure_index(corpus, args.corpus_size, args.cache)
        result["recall_at_10"] = round(index["recall_at_10"], 4)
        result["ann_qps_ratio"] = round(index["ann_qps_ratio"], 2)
        result["corpus_size"] = index["corpus_size"]
    if args.plot:
        from tests.load import plotting

        path = plotting.batch_figure(
            batching["batches"], plotting.PLOTS_DIR / "search-batches.png",
            "search: batches the encoder micro-batcher formed",
        )  # fmt: skip
        print(f"  wrote {path.relative_to(ROOT)}")
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
