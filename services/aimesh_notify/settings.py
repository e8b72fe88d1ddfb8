"""Settings of the notify service and its delivery worker."""

from __future__ import annotations

from dataclasses import dataclass

from aimesh_runtime.config import ConfigError, key_bytes, setting


@dataclass(frozen=True)
class NotifySettings:
    secret_encryption_key: str = setting(
        "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY",
        "32 random bytes, base64url; seals the webhook signing secrets stored in the database "
        "(the service and every `python -m aimesh_notify.worker` need the same one).",
    )
    previous_secret_encryption_keys: str = setting(
        "AIMESH_NOTIFY_PREVIOUS_SECRET_ENCRYPTION_KEYS",
        "Keys being rotated out, comma-separated, each like "
        "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY: secrets they sealed still open, and every "
        "start (and the service hourly) reseals them under the current key.",
        "",
    )
    allow_private_webhooks: bool = setting(
        "AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS",
        "Let webhooks reach loopback, private and link-local networks; for local "
        "development and tests only (it turns the SSRF guard off).",
        False,
    )
    worker_concurrency: int = setting(
        "AIMESH_NOTIFY_WORKER_CONCURRENCY",
        "Webhook attempts in flight at once in the service process; 0 runs no worker "
        "there (run `python -m aimesh_notify.worker` instead).",
        64,
    )
    claim_batch: int = setting(
        "AIMESH_NOTIFY_CLAIM_BATCH", "Most deliveries a worker claims in one round trip.", 100
    )
    max_attempts: int = setting(
        "AIMESH_NOTIFY_MAX_ATTEMPTS", "Attempts before a delivery goes to dead letter.", 8
    )
    backoff_base_s: float = setting(
        "AIMESH_NOTIFY_BACKOFF_BASE_S",
        "First retry delay ceiling; it doubles per attempt, and the delay is drawn "
        "uniformly below it (full jitter).",
        2.0,
    )
    backoff_cap_s: float = setting(
        "AIMESH_NOTIFY_BACKOFF_CAP_S", "Largest retry delay ceiling.", 3600.0
    )
    pause_after_failures: int = setting(
        "AIMESH_NOTIFY_PAUSE_AFTER_FAILURES",
        "Attempts in a row without an answer (or with 5xx, 429) after which a subscription's "
        "due deliveries are paused, so a receiver that hangs does not hold every worker; "
        "0 never pauses.",
        5,
    )
    pause_first_s: float = setting(
        "AIMESH_NOTIFY_PAUSE_FIRST_S",
        "The first pause of such a subscription; it doubles while failures go on.",
        5.0,
    )
    pause_max_s: float = setting(
        "AIMESH_NOTIFY_PAUSE_MAX_S", "The longest pause of such a subscription.", 300.0
    )
    visibility_timeout_s: float = setting(
        "AIMESH_NOTIFY_VISIBILITY_TIMEOUT_S",
        "Lease of a claimed delivery beyond its webhook timeout; a worker that dies "
        "holding one loses it after this, and another worker takes the delivery over.",
        30.0,
    )
    poll_s: float = setting(
        "AIMESH_NOTIFY_POLL_S",
        "Longest a worker sleeps between claims when no NOTIFY wakes it (retries "
        "that come due, lost notifications).",
        1.0,
    )
    queue_stats_s: float = setting(
        "AIMESH_NOTIFY_QUEUE_STATS_S",
        "How often the service reads the queue's depth and lag for its metrics.",
        15.0,
    )
    event_retention_days: float = setting(
        "AIMESH_NOTIFY_EVENT_RETENTION_DAYS",
        "How long events, and so idempotency keys and stream history, are kept.",
        7.0,
    )

    def check(self) -> None:
        self.secret_key_bytes()  # a bad key stops the start, naming the variable
        self.previous_key_bytes()
        if self.worker_concurrency < 0:
            raise ConfigError("AIMESH_NOTIFY_WORKER_CONCURRENCY must not be negative")
        if self.claim_batch < 1:
            raise ConfigError("AIMESH_NOTIFY_CLAIM_BATCH must be at least 1")
        if self.max_attempts < 1:
            raise ConfigError("AIMESH_NOTIFY_MAX_ATTEMPTS must be at least 1")
        if self.backoff_base_s < 0 or self.backoff_cap_s < self.backoff_base_s:
            raise ConfigError(
                "AIMESH_NOTIFY_BACKOFF_BASE_S must not be negative nor above "
                "AIMESH_NOTIFY_BACKOFF_CAP_S"
            )
        if self.visibility_timeout_s <= 0 or self.poll_s <= 0 or self.queue_stats_s <= 0:
            raise ConfigError(
                "AIMESH_NOTIFY_VISIBILITY_TIMEOUT_S, AIMESH_NOTIFY_POLL_S and "
                "AIMESH_NOTIFY_QUEUE_STATS_S must be positive"
            )
        if self.pause_after_failures < 0 or not 0 < self.pause_first_s <= self.pause_max_s:
            raise ConfigError(
                "AIMESH_NOTIFY_PAUSE_AFTER_FAILURES must not be negative, and "
                "AIMESH_NOTIFY_PAUSE_FIRST_S must be positive and not above "
                "AIMESH_NOTIFY_PAUSE_MAX_S"
            )
        if self.event_retention_days <= 0:
            raise ConfigError("AIMESH_NOTIFY_EVENT_RETENTION_DAYS must be positive")

    def secret_key_bytes(self) -> bytes:
        return key_bytes(self.secret_encryption_key, "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY")

    def previous_key_bytes(self) -> list[bytes]:
        return [
            key_bytes(value.strip(), "AIMESH_NOTIFY_PREVIOUS_SECRET_ENCRYPTION_KEYS")
            for value in self.previous_secret_encryption_keys.split(",")
            if value.strip()
        ]
