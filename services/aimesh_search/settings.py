"""Settings of the search service, on top of the shared runtime ones."""

from __future__ import annotations

from dataclasses import dataclass

from aimesh_runtime.config import ConfigError, setting


@dataclass(frozen=True)
class SearchSettings:
    model_path: str = setting(
        "AIMESH_SEARCH_MODEL_PATH",
        "sentence-transformers model folder; empty means the packaged all-MiniLM-L6-v2.",
        "",
    )
    model_name: str = setting(
        "AIMESH_SEARCH_MODEL_NAME", "Name collections use for the model.", "all-MiniLM-L6-v2"
    )
    device: str = setting(
        "AIMESH_SEARCH_DEVICE", "auto (CUDA with fp16 when present), cuda or cpu.", "auto"
    )
    faiss_gpu: bool = setting(
        "AIMESH_SEARCH_FAISS_GPU", "Search on the GPU when faiss-gpu and a GPU are present.", True
    )
    faiss_threads: int = setting(
        "AIMESH_SEARCH_FAISS_THREADS",
        "OpenMP threads per index search on a CPU; 0 means faiss's default (every core)."
        " One leaves the cores to the encoder copies.",
        1,
    )
    batching: bool = setting(
        "AIMESH_SEARCH_BATCHING", "Coalesce concurrent encodes into batches.", True
    )
    encoder_workers: int = setting(
        "AIMESH_SEARCH_ENCODER_WORKERS",
        "Copies of the encoder running batches side by side; 0 means one per CPU core"
        " (at most 4) on a CPU and one on a GPU.",
        0,
    )
    torch_threads: int = setting(
        "AIMESH_SEARCH_TORCH_THREADS",
        "Torch threads per encoder copy on a CPU; 0 means the cores divided among the copies.",
        0,
    )
    encoder_process: bool = setting(
        "AIMESH_SEARCH_ENCODER_PROCESS",
        "On a CPU, run each encoder copy in a child process rather than a thread beside the"
        " event loop, so its Python does not wait on the loop's interpreter lock.",
        True,
    )
    max_batch: int = setting("AIMESH_SEARCH_MAX_BATCH", "Most texts encoded at once.", 64)
    max_wait_ms: float = setting(
        "AIMESH_SEARCH_MAX_WAIT_MS", "Longest a text waits for its batch to fill.", 5.0
    )
    queue_size: int = setting(
        "AIMESH_SEARCH_QUEUE_SIZE",
        "Texts waiting to be encoded before callers get RESOURCE_EXHAUSTED.",
        2048,
    )
    cache_size: int = setting(
        "AIMESH_SEARCH_QUERY_CACHE", "Query embeddings kept for repeated queries.", 10_000
    )
    ann_threshold: int = setting(
        "AIMESH_SEARCH_ANN_THRESHOLD",
        "A collection switches from exact search to an HNSW index at this many documents.",
        20_000,
    )
    ann_ef_search: int = setting(
        "AIMESH_SEARCH_ANN_EF_SEARCH",
        "HNSW candidates kept per query (recall against speed; 64 gave recall@10 0.97).",
        64,
    )
    import_batch: int = setting(
        "AIMESH_SEARCH_IMPORT_BATCH", "Import lines committed together.", 256
    )
    reserved_collections: str = setting(
        "AIMESH_SEARCH_RESERVED_COLLECTIONS",
        "Comma-separated collection ids only admins and service accounts may create, "
        "besides every id starting with platform-: recommend's item collection by default "
        "(list it here if AIMESH_RECOMMEND_SEARCH_COLLECTION names another).",
        "recommend-items",
    )

    def check(self) -> None:
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"AIMESH_SEARCH_DEVICE={self.device!r} is invalid: auto, cuda or cpu")
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError("AIMESH_SEARCH_MAX_BATCH must be between 1 and 4096")
        if self.max_wait_ms < 0 or self.queue_size < 1 or self.cache_size < 0:
            raise ConfigError(
                "AIMESH_SEARCH_MAX_WAIT_MS, _QUEUE_SIZE and _QUERY_CACHE must be positive"
            )
        if self.encoder_workers < 0 or self.torch_threads < 0 or self.faiss_threads < 0:
            raise ConfigError(
                "AIMESH_SEARCH_ENCODER_WORKERS, _TORCH_THREADS and _FAISS_THREADS must be"
                " 0 (automatic) or more"
            )
        if self.ann_threshold < 1000 or self.ann_ef_search < 1:
            raise ConfigError(
                "AIMESH_SEARCH_ANN_THRESHOLD must be at least 1000, _ANN_EF_SEARCH at least 1"
            )
