"""Settings of the user service, on top of the shared runtime ones."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from aimesh_runtime.config import ConfigError, setting


@dataclass(frozen=True)
class UserSettings:
    key_encryption_key: str = setting(
        "AIMESH_USER_KEY_ENCRYPTION_KEY",
        "32 random bytes, base64url; seals the JWT signing keys stored in the database.",
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

    def check(self) -> None:
        if len(self.kek_bytes()) != 32:
            raise ConfigError("AIMESH_USER_KEY_ENCRYPTION_KEY must decode to 32 bytes")
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

    def kek_bytes(self) -> bytes:
        try:
            return base64.urlsafe_b64decode(
                self.key_encryption_key + "=" * (-len(self.key_encryption_key) % 4)
            )
        except (binascii.Error, ValueError):
            raise ConfigError("AIMESH_USER_KEY_ENCRYPTION_KEY is not base64url") from None
