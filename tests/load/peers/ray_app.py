"""Search or recommend on Ray Serve 2.60, as a team would serve them instead of aimesh.

Run with .aimesh/peers/ray/bin/python (Ray Serve, torch, and the project's
model code and protos, so both sides run the same model):
  ray_app.py search|recommend DATA_FILE GRPC_PORT HTTP_PORT
prints {"port": GRPC_PORT} once the application is running, then serves until
a line arrives on stdin.

Ray's own gRPC ingress serves aimesh's SearchService / RecommendService
protos; each deployment has 2 replicas with one torch thread (the 2 cores),
`@serve.batch` at the aimesh service's batch size and wait, and
max_ongoing_requests raised to that batch size. No auth, no
validation, no store: the peer does only the model's work.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from typing import Any

import ray
from ray import serve
from ray.serve.config import gRPCOptions

REPLICAS = 2


# max_ongoing_requests at least the batch size, as Ray's docs advise for
# @serve.batch: its default (5) would cap every batch at 5.
@serve.deployment(num_replicas=REPLICAS, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Search:
    def __init__(self, data_file: str) -> None:
        import numpy as np
        import torch

        from aimesh_search.encoder import Encoder
        from aimesh_search.index import VectorIndex, faiss

        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        with open(data_file) as source:
            self.documents: list[str] = json.load(source)["documents"]
        self.encoder = Encoder("", "all-MiniLM-L6-v2", "cpu")
        self.index = VectorIndex(self.encoder.dimension, ann_threshold=20_000, ef_search=64)
        ids = np.arange(len(self.documents), dtype=np.int64)
        self.index.load(ids, self.encoder.encode(self.documents).vectors)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def top10(self, queries: list[str]) -> list[list[tuple[int, float]]]:
        vectors = self.encoder.encode(queries).vectors
        scores, ids = self.index._search(vectors, 10, None)
        return [
            [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
            for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    async def Search(self, request: Any) -> Any:
        from aimesh.search.v1 import search_service_pb2 as pb

        found = await self.top10(request.query)
        return pb.SearchResponse(
            results=[
                pb.SearchResult(
                    document=f"{request.parent}/documents/d{i}", score=s, text=self.documents[i]
                )
                for i, s in found[: request.top_k]
            ]
        )


@serve.deployment(
    num_replicas=REPLICAS, max_ongoing_requests=128, ray_actor_options={"num_cpus": 1}
)
class Recommend:
    def __init__(self, data_file: str) -> None:
        import torch

        from aimesh_recommend import model as mf
        from aimesh_recommend.scoring import ServingModel

        torch.set_num_threads(1)
        with open(data_file, "rb") as source:
            data = pickle.load(source)
        self.serving = ServingModel(
            "v1",
            mf.from_bytes(data["blob"]),
            data["user_ids"],
            data["item_ids"],
            data["seen"],
            torch.device("cpu"),
        )

    @serve.batch(max_batch_size=128, batch_wait_timeout_s=0.002)
    async def rank(self, rows: list[int]) -> list[Any]:
        from aimesh_recommend.scoring import MAX_K, ScoreRequest

        serving = self.serving
        return serving.score(
            [ScoreRequest(serving, row, tuple(serving.seen.get(row, ()))) for row in rows], MAX_K
        )

    async def Recommend(self, request: Any) -> Any:
        from aimesh.recommend.v1 import recommend_service_pb2 as pb

        ranked = await self.rank(self.serving.user_index[request.user])
        items = self.serving.item_ids
        return pb.RecommendResponse(
            items=[
                pb.ScoredItem(item=f"items/{items[row]}", score=score)
                for row, score in zip(
                    ranked.rows[: request.k], ranked.scores[: request.k], strict=True
                )
            ],
            model_version="v1",
        )


SERVICERS = {
    "search": "aimesh.search.v1.search_service_pb2_grpc.add_SearchServiceServicer_to_server",
    "recommend": (
        "aimesh.recommend.v1.recommend_service_pb2_grpc.add_RecommendServiceServicer_to_server"
    ),
}


def main() -> None:
    job, data_file, grpc_port, http_port = sys.argv[1:5]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2)
    serve.start(
        http_options={"host": "127.0.0.1", "port": int(http_port)},
        grpc_options=gRPCOptions(port=int(grpc_port), grpc_servicer_functions=[SERVICERS[job]]),
    )
    deployment = Search if job == "search" else Recommend
    serve.run(deployment.bind(data_file), name=job, route_prefix=f"/{job}")
    print(json.dumps({"port": int(grpc_port)}), flush=True)
    sys.stdin.readline()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
