"""Settings of the recommend service, on top of the shared runtime ones."""

from __future__ import annotations

import re
from dataclasses import dataclass

from aimesh_runtime.config import SERVICE_PORTS, ConfigError, setting

VERSION = re.compile(r"^[a-z0-9][a-z0-9.-]{0,31}$")


@dataclass(frozen=True)
class RecommendSettings:
    model_version: str = setting(
        "AIMESH_RECOMMEND_MODEL_VERSION",
        "Model version this deployment serves (v1 in one deployment, v2 in another).",
        "v1",
    )
    device: str = setting(
        "AIMESH_RECOMMEND_DEVICE", "auto (CUDA when present), cuda or cpu.", "auto"
    )
    torch_threads: int = setting(
        "AIMESH_RECOMMEND_TORCH_THREADS",
        "Torch intra-op threads on CPU; 0 keeps torch's default. One leaves the other "
        "cores to the event loop (on 2 vCPUs, two threads spin against it).",
        1,
    )
    scoring_process: bool = setting(
        "AIMESH_RECOMMEND_SCORING_PROCESS",
        "On CPU, score in a child process rather than a thread beside the event loop, "
        "so scoring's Python does not wait on the loop's interpreter lock.",
        True,
    )
    batching: bool = setting(
        "AIMESH_RECOMMEND_BATCHING", "Score concurrent requests together in one matmul.", True
    )
    max_batch: int = setting("AIMESH_RECOMMEND_MAX_BATCH", "Most users scored at once.", 128)
    max_wait_ms: float = setting(
        "AIMESH_RECOMMEND_MAX_WAIT_MS", "Longest a request waits for its batch to fill.", 2.0
    )
    queue_size: int = setting(
        "AIMESH_RECOMMEND_QUEUE_SIZE",
        "Requests waiting to be scored before callers get RESOURCE_EXHAUSTED.",
        4096,
    )
    cache_ttl_s: float = setting(
        "AIMESH_RECOMMEND_CACHE_TTL_S",
        "How long a user's recommendations are reused; 0 turns the cache off.",
        60.0,
    )
    cache_size: int = setting(
        "AIMESH_RECOMMEND_CACHE_SIZE", "Entries of the in-process result cache.", 100_000
    )
    redis_url: str = setting(
        "AIMESH_REDIS_URL", "redis:// URL of a shared result cache; empty keeps it in-process.", ""
    )
    search_address: str = setting(
        "AIMESH_SEARCH_ADDRESS",
        "host:port of the search service, which embeds item text.",
        f"127.0.0.1:{SERVICE_PORTS['search']}",
    )
    search_collection: str = setting(
        "AIMESH_RECOMMEND_SEARCH_COLLECTION",
        "Search collection holding the item texts.",
        "recommend-items",
    )
    search_timeout_s: float = setting(
        "AIMESH_RECOMMEND_SEARCH_TIMEOUT_S", "Longest wait for search, whatever the deadline.", 2.0
    )
    min_interactions: int = setting(
        "AIMESH_RECOMMEND_MIN_INTERACTIONS", "Interactions needed before a model may train.", 50
    )
    min_users: int = setting(
        "AIMESH_RECOMMEND_MIN_USERS", "Distinct users needed before a model may train.", 5
    )
    default_epochs: int = setting(
        "AIMESH_RECOMMEND_EPOCHS", "Epochs when a training job asks for 0.", 20
    )
    dimension: int = setting("AIMESH_RECOMMEND_DIMENSION", "Length of the embeddings.", 32)
    refresh_s: float = setting(
        "AIMESH_RECOMMEND_REFRESH_S",
        "How often the served version and popularity are reloaded"
        " (and the catalogue, when it changed).",
        5.0,
    )
    serving_flush_s: float = setting(
        "AIMESH_RECOMMEND_SERVING_FLUSH_S", "How often recorded servings are written.", 0.5
    )

    def check(self) -> None:
        if not VERSION.match(self.model_version):
            raise ConfigError(
                f"AIMESH_RECOMMEND_MODEL_VERSION={self.model_version!r} is invalid: "
                "lower-case letters, digits, '.' and '-', e.g. v2"
            )
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(
                f"AIMESH_RECOMMEND_DEVICE={self.device!r} is invalid: auto, cuda or cpu"
            )
        if not 1 <= self.max_batch <= 4096 or self.queue_size < 1 or self.max_wait_ms < 0:
            raise ConfigError(
                "AIMESH_RECOMMEND_MAX_BATCH must be 1..4096, _QUEUE_SIZE positive, "
                "_MAX_WAIT_MS not negative"
            )
        if self.torch_threads < 0:
            raise ConfigError("AIMESH_RECOMMEND_TORCH_THREADS must not be negative")
        if self.cache_ttl_s < 0 or self.cache_size < 0:
            raise ConfigError("AIMESH_RECOMMEND_CACHE_TTL_S and _CACHE_SIZE must not be negative")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("AIMESH_REDIS_URL is invalid: expected a redis:// URL")
        if self.min_interactions < 2 or self.min_users < 1:
            raise ConfigError("AIMESH_RECOMMEND_MIN_INTERACTIONS >= 2 and _MIN_USERS >= 1")
        if not 1 <= self.default_epochs <= 1000 or not 2 <= self.dimension <= 1024:
            raise ConfigError("AIMESH_RECOMMEND_EPOCHS 1..1000, _DIMENSION 2..1024")
        if self.search_timeout_s <= 0 or self.refresh_s <= 0 or self.serving_flush_s <= 0:
            raise ConfigError(
                "AIMESH_RECOMMEND_SEARCH_TIMEOUT_S, _REFRESH_S, _SERVING_FLUSH_S must be positive"
            )
