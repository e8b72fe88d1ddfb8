"""Settings of the user service, on top of the shared runtime ones."""

from __future__ import annotations

import re
from dataclasses import dataclass

from aimesh_runtime.config import ConfigError, key_bytes, setting

# What `aimesh up` generates: amk_, 8 hex digits, _, then token_urlsafe(32).
PLATFORM_KEY = re.compile(r"^amk_[0-9a-f]{8}_[A-Za-z0-9_-]{32,}$")


@dataclass(frozen=True)
class UserSettings:
    key_encryption_key: str = setting(
        "AIMESH_USER_KEY_ENCRYPTION_KEY",
        "32 random bytes, base64url; seals the JWT signing keys stored in the database.",
    )
    previous_key_encryption_keys: str = setting(
        "AIMESH_USER_PREVIOUS_KEY_ENCRYPTION_KEYS",
        "Comma-separated former key-encryption keys: they still open signing keys, which "
        "every start reseals under the current one. Drop a key once a start has run.",
        "",
    )
    access_token_ttl_s: int = setting(
        "AIMESH_USER_ACCESS_TOKEN_TTL_S", "Lifetime of access tokens.", 900
    )
    refresh_token_ttl_s: int = setting(
        "AIMESH_USER_REFRESH_TOKEN_TTL_S", "Lifetime of refresh tokens.", 30 * 24 * 3600
    )
    signing_key_rotation_s: int = setting(
        "AIMESH_USER_SIGNING_KEY_ROTATION_S",
        "Rotate the signing key after this long.",
        30 * 24 * 3600,
    )
    key_publish_lead_s: int = setting(
        "AIMESH_USER_KEY_PUBLISH_LEAD_S",
        "A rotated-in key is in the JWKS this long before it signs (cover JWKS caches).",
        300,
    )
    bootstrap_admin_email: str = setting(
        "AIMESH_USER_BOOTSTRAP_ADMIN_EMAIL", "Create this admin at start if missing.", ""
    )
    bootstrap_admin_password: str = setting(
        "AIMESH_USER_BOOTSTRAP_ADMIN_PASSWORD", "Password of the bootstrap admin.", ""
    )
    bootstrap_service_api_key: str = setting(
        "AIMESH_USER_BOOTSTRAP_SERVICE_API_KEY",
        "Create this API key (amk_<8 hex>_<secret>) for a generic service account at start "
        "if missing: a backend's (mesh.service), which publishes none of the platform's "
        "topics. The platform's own services each have their own, below.",
        "",
    )
    # Each platform service's own account and key (README, "Who may do what"); the
    # service sends the same value as AIMESH_<SERVICE>_SERVICE_API_KEY.
    bootstrap_search_service_api_key: str = setting(
        "AIMESH_USER_BOOTSTRAP_SEARCH_SERVICE_API_KEY",
        "Create the search service's account with this API key at start if missing.",
        "",
    )
    bootstrap_recommend_service_api_key: str = setting(
        "AIMESH_USER_BOOTSTRAP_RECOMMEND_SERVICE_API_KEY",
        "Create the recommend service's account with this API key at start if missing.",
        "",
    )
    bootstrap_chat_service_api_key: str = setting(
        "AIMESH_USER_BOOTSTRAP_CHAT_SERVICE_API_KEY",
        "Create the chat service's account with this API key at start if missing.",
        "",
    )
    bootstrap_notify_service_api_key: str = setting(
        "AIMESH_USER_BOOTSTRAP_NOTIFY_SERVICE_API_KEY",
        "Create the notify service's account with this API key at start if missing.",
        "",
    )
    # Peers of the user-deletion saga. Empty means not deployed: the step is
    # recorded as skipped, which only dev allows (prod refuses to start).
    chat_address: str = setting(
        "AIMESH_CHAT_ADDRESS", "host:port of chat, whose PurgeUserData the deletion saga calls.", ""
    )
    recommend_address: str = setting(
        "AIMESH_RECOMMEND_ADDRESS", "host:port of recommend, for the deletion saga.", ""
    )
    search_address: str = setting(
        "AIMESH_SEARCH_ADDRESS", "host:port of search, for the deletion saga.", ""
    )
    register_per_client_per_hour: int = setting(
        "AIMESH_USER_REGISTER_PER_CLIENT_PER_HOUR",
        "Register calls a client address may make an hour (a burst of as many at once).",
        20,
    )
    register_per_email_per_hour: int = setting(
        "AIMESH_USER_REGISTER_PER_EMAIL_PER_HOUR",
        "Register calls for one email an hour, from anywhere.",
        5,
    )
    deletion_step_timeout_s: float = setting(
        "AIMESH_USER_DELETION_STEP_TIMEOUT_S", "Deadline of each PurgeUserData call.", 10.0
    )
    deletion_retry_max_s: float = setting(
        "AIMESH_USER_DELETION_RETRY_MAX_S", "Longest backoff between retries of a step.", 300.0
    )
    login_free_failures: int = setting(
        "AIMESH_USER_LOGIN_FREE_FAILURES",
        "Failed logins in a row for one email before each further one locks it a while.",
        5,
    )
    login_address_free_failures: int = setting(
        "AIMESH_USER_LOGIN_ADDRESS_FREE_FAILURES",
        "Failed logins from one client address before each further one locks the address.",
        50,
    )
    login_base_delay_s: float = setting(
        "AIMESH_USER_LOGIN_BASE_DELAY_S",
        "Lock after the first failed login past the free ones; doubles per further failure.",
        1.0,
    )
    login_max_delay_s: float = setting(
        "AIMESH_USER_LOGIN_MAX_DELAY_S",
        "Longest lock after failed logins (the delay doubles per failure up to this).",
        30.0,
    )
    deletion_lease_s: float = setting(
        "AIMESH_USER_DELETION_LEASE_S",
        "A saga whose runner is silent this long is resumed by another process.",
        60.0,
    )
    deletion_resume_s: float = setting(
        "AIMESH_USER_DELETION_RESUME_S", "How often unfinished sagas are looked for.", 5.0
    )
    deletion_wait_s: float = setting(
        "AIMESH_USER_DELETION_WAIT_S",
        "How long DeleteUser waits for its saga before returning it RUNNING.",
        10.0,
    )

    def check(self) -> None:
        self.kek_bytes()  # a bad key stops the start, naming the variable
        self.previous_kek_bytes()
        if not 60 <= self.access_token_ttl_s <= 3600:
            raise ConfigError("AIMESH_USER_ACCESS_TOKEN_TTL_S must be between 60 and 3600")
        if self.refresh_token_ttl_s < self.access_token_ttl_s:
            raise ConfigError("AIMESH_USER_REFRESH_TOKEN_TTL_S must exceed the access token TTL")
        if self.signing_key_rotation_s < 2 * self.access_token_ttl_s:
            raise ConfigError(
                "AIMESH_USER_SIGNING_KEY_ROTATION_S must be at least twice the access token TTL"
            )
        if not 0 <= self.key_publish_lead_s <= 86_400:
            raise ConfigError("AIMESH_USER_KEY_PUBLISH_LEAD_S must be between 0 and 86400")
        if bool(self.bootstrap_admin_email) != bool(self.bootstrap_admin_password):
            raise ConfigError(
                "AIMESH_USER_BOOTSTRAP_ADMIN_EMAIL and AIMESH_USER_BOOTSTRAP_ADMIN_PASSWORD "
                "go together"
            )

        self.platform_service_keys()  # a malformed or shared key stops the start here
        if self.register_per_client_per_hour < 1 or self.register_per_email_per_hour < 1:
            raise ConfigError("AIMESH_USER_REGISTER_PER_*_PER_HOUR must be at least 1")
        if self.login_free_failures < 1 or self.login_address_free_failures < 1:
            raise ConfigError("AIMESH_USER_LOGIN_*_FREE_FAILURES must be at least 1")
        if not 0 < self.login_base_delay_s <= self.login_max_delay_s <= 3600:
            raise ConfigError(
                "AIMESH_USER_LOGIN_BASE_DELAY_S must be positive and at most "
                "AIMESH_USER_LOGIN_MAX_DELAY_S, itself at most 3600"
            )
        if self.deletion_step_timeout_s <= 0 or self.deletion_retry_max_s <= 0:
            raise ConfigError(
                "AIMESH_USER_DELETION_STEP_TIMEOUT_S and _RETRY_MAX_S must be positive"
            )
        if self.deletion_lease_s < 2 * self.deletion_step_timeout_s:
            raise ConfigError(
                "AIMESH_USER_DELETION_LEASE_S must be at least twice the step timeout"
            )
        if self.deletion_resume_s <= 0 or self.deletion_wait_s < 0:
            raise ConfigError("AIMESH_USER_DELETION_RESUME_S and _WAIT_S must not be negative")

    def platform_service_keys(self) -> dict[str, str]:
        """The API key to bootstrap for each platform service that has one set."""
        keys = {
            "search": self.bootstrap_search_service_api_key,
            "recommend": self.bootstrap_recommend_service_api_key,
            "chat": self.bootstrap_chat_service_api_key,
            "notify": self.bootstrap_notify_service_api_key,
        }
        keys = {service: key for service, key in keys.items() if key}
        for service, key in keys.items():
            if not PLATFORM_KEY.match(key):
                raise ConfigError(
                    f"AIMESH_USER_BOOTSTRAP_{service.upper()}_SERVICE_API_KEY must look like "
                    "amk_<8 hex>_<secret of 32 or more characters>"
                )
        shared = [*keys.values(), self.bootstrap_service_api_key]
        prefixes = [key.split("_")[1] for key in shared if key]
        if len(set(prefixes)) < len(prefixes):
            raise ConfigError(
                "AIMESH_USER_BOOTSTRAP_*SERVICE_API_KEY: each service needs a key of its own"
            )
        return keys

    def kek_bytes(self) -> bytes:
        return key_bytes(self.key_encryption_key, "AIMESH_USER_KEY_ENCRYPTION_KEY")

    def previous_kek_bytes(self) -> list[bytes]:
        return [
            key_bytes(value.strip(), "AIMESH_USER_PREVIOUS_KEY_ENCRYPTION_KEYS")
            for value in self.previous_key_encryption_keys.split(",")
            if value.strip()
        ]
