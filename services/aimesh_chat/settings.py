"""Settings of the chat service, on top of the shared runtime ones."""

from __future__ import annotations

from dataclasses import dataclass

from aimesh_runtime.config import SERVICE_PORTS, ConfigError, setting


@dataclass(frozen=True)
class ChatSettings:
    # No default key on purpose: without one the service runs degraded, and says so.
    anthropic_api_key: str = setting(
        "ANTHROPIC_API_KEY",
        "Anthropic API key; empty runs without a live model (replay or extractive answers).",
        "",
    )
    anthropic_base_url: str = setting(
        "AIMESH_CHAT_ANTHROPIC_BASE_URL",
        "Base URL of the Anthropic Messages API; empty means the SDK's default.",
        "",
    )
    model: str = setting("AIMESH_CHAT_MODEL", "Claude model that answers.", "claude-sonnet-4-6")
    max_output_tokens: int = setting(
        "AIMESH_CHAT_MAX_OUTPUT_TOKENS", "Most tokens the model may write per answer.", 1024
    )
    max_message_tokens: int = setting(
        "AIMESH_CHAT_MAX_MESSAGE_TOKENS",
        "Largest user message, by token estimate; more is INVALID_ARGUMENT.",
        4096,
    )
    history_messages: int = setting(
        "AIMESH_CHAT_HISTORY_MESSAGES", "Earlier messages of the conversation sent as context.", 20
    )
    daily_token_budget: int = setting(
        "AIMESH_CHAT_DAILY_TOKEN_BUDGET",
        "Tokens (input + output) a principal may use per UTC day.",
        200_000,
    )
    first_token_timeout_s: float = setting(
        "AIMESH_CHAT_FIRST_TOKEN_TIMEOUT_S",
        "How long to wait for the model's first token before answering extractively.",
        15.0,
    )
    model_breaker_failures: int = setting(
        "AIMESH_CHAT_MODEL_BREAKER_FAILURES", "Consecutive model failures that open its breaker.", 5
    )
    model_breaker_reset_s: float = setting(
        "AIMESH_CHAT_MODEL_BREAKER_RESET_S", "How long the model's breaker stays open.", 30.0
    )
    search_address: str = setting(
        "AIMESH_SEARCH_ADDRESS",
        "host:port of the search service.",
        f"127.0.0.1:{SERVICE_PORTS['search']}",
    )
    search_timeout_s: float = setting(
        "AIMESH_CHAT_SEARCH_TIMEOUT_S", "Longest wait for search, whatever the deadline.", 2.0
    )
    search_deadline_share: float = setting(
        "AIMESH_CHAT_SEARCH_DEADLINE_SHARE",
        "Share of the caller's remaining deadline that search may use, 0 to 1.",
        0.25,
    )
    replay_dir: str = setting(
        "AIMESH_CHAT_REPLAY_DIR",
        "Folder of recorded model streams: written with a key, replayed without one; "
        "empty turns recording and replay off.",
        "",
    )

    def check(self) -> None:
        if self.max_output_tokens < 1 or self.max_message_tokens < 1:
            raise ConfigError(
                "AIMESH_CHAT_MAX_OUTPUT_TOKENS and AIMESH_CHAT_MAX_MESSAGE_TOKENS must be positive"
            )
        if self.daily_token_budget < 0:
            raise ConfigError("AIMESH_CHAT_DAILY_TOKEN_BUDGET must not be negative")
        if self.history_messages < 0:
            raise ConfigError("AIMESH_CHAT_HISTORY_MESSAGES must not be negative")
        if not 0.0 < self.search_deadline_share <= 1.0:
            raise ConfigError("AIMESH_CHAT_SEARCH_DEADLINE_SHARE must be in (0, 1]")
        if self.first_token_timeout_s <= 0 or self.search_timeout_s <= 0:
            raise ConfigError(
                "AIMESH_CHAT_FIRST_TOKEN_TIMEOUT_S and AIMESH_CHAT_SEARCH_TIMEOUT_S "
                "must be positive"
            )
        if self.model_breaker_failures < 1 or self.model_breaker_reset_s <= 0:
            raise ConfigError("AIMESH_CHAT_MODEL_BREAKER_* must be positive")
