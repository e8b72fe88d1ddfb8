"""Typed settings from the environment."""

from __future__ import annotations

import pathlib

import pytest

from aimesh_notify.settings import NotifySettings
from aimesh_runtime.config import (
    ConfigError,
    RuntimeConfig,
    database_url,
    load,
    service_api_key,
)
from aimesh_user.settings import UserSettings

KEK = "A" * 43  # 32 bytes, base64url


def test_defaults_and_typed_values() -> None:
    config = load(RuntimeConfig, {"AIMESH_RATE_LIMIT_RPS": "12.5", "AIMESH_REFLECTION": "off"})
    assert config.rate_limit_rps == 12.5 and config.reflection_enabled is False
    assert config.ports_for("search") == (50052, 51052)
    assert load(RuntimeConfig, {"AIMESH_GRPC_PORT": "0"}).ports_for("user") == (0, 51051)


def test_prod_turns_reflection_off_unless_asked() -> None:
    assert load(RuntimeConfig, {"AIMESH_ENV": "prod"}).reflection_enabled is False
    assert load(
        RuntimeConfig, {"AIMESH_ENV": "prod", "AIMESH_REFLECTION": "true"}
    ).reflection_enabled
    assert load(RuntimeConfig, {}).reflection_enabled


@pytest.mark.parametrize(
    "environ,named",
    [
        ({"AIMESH_GRPC_PORT": "http"}, "AIMESH_GRPC_PORT"),
        ({"AIMESH_GRPC_PORT": "70000"}, "AIMESH_GRPC_PORT"),
        ({"AIMESH_TRACE_SAMPLE_RATIO": "2"}, "AIMESH_TRACE_SAMPLE_RATIO"),
        ({"AIMESH_LOG_LEVEL": "LOUD"}, "AIMESH_LOG_LEVEL"),
        ({"AIMESH_RATE_LIMIT_BURST": "0"}, "AIMESH_RATE_LIMIT_BURST"),
        ({"AIMESH_DRAIN_SECONDS": "soon"}, "AIMESH_DRAIN_SECONDS"),
    ],
)
def test_bad_values_name_their_variable(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(RuntimeConfig, environ)


def test_secrets_have_no_default() -> None:
    with pytest.raises(ConfigError, match="AIMESH_USER_KEY_ENCRYPTION_KEY is required"):
        load(UserSettings, {})
    assert len(load(UserSettings, {"AIMESH_USER_KEY_ENCRYPTION_KEY": KEK}).kek_bytes()) == 32


@pytest.mark.parametrize(
    "environ,message",
    [
        ({}, "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY is required"),
        ({"AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY": "short"}, "is not base64url"),
        ({"AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY": "A" * 42}, "must decode to 32 bytes"),
    ],
)
def test_the_notify_secret_key_is_required_and_checked(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(NotifySettings, environ)
    settings = load(NotifySettings, {"AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY": KEK})
    assert len(settings.secret_key_bytes()) == 32


def test_bootstrap_admin_needs_both_halves() -> None:
    with pytest.raises(ConfigError, match="go together"):
        load(
            UserSettings,
            {"AIMESH_USER_KEY_ENCRYPTION_KEY": KEK, "AIMESH_USER_BOOTSTRAP_ADMIN_EMAIL": "a@b.c"},
        )


def test_each_platform_service_key_is_well_formed_and_its_own(tmp_path: pathlib.Path) -> None:
    search = "amk_0123abcd_" + "s" * 40
    environ = {"AIMESH_USER_KEY_ENCRYPTION_KEY": KEK}
    short = {**environ, "AIMESH_USER_BOOTSTRAP_CHAT_SERVICE_API_KEY": "amk_0123abcd_short"}
    with pytest.raises(ConfigError, match="AIMESH_USER_BOOTSTRAP_CHAT_SERVICE_API_KEY"):
        load(UserSettings, short)
    shared = {
        **environ,
        "AIMESH_USER_BOOTSTRAP_SEARCH_SERVICE_API_KEY": search,
        "AIMESH_USER_BOOTSTRAP_CHAT_SERVICE_API_KEY": search,
    }
    with pytest.raises(ConfigError, match="a key of its own"):
        load(UserSettings, shared)
    key_file = tmp_path / "search"
    key_file.write_text(search + "\n")
    settings = load(
        UserSettings,
        {**environ, "AIMESH_USER_BOOTSTRAP_SEARCH_SERVICE_API_KEY_FILE": str(key_file)},
    )
    assert settings.platform_service_keys() == {"search": search}
    # The service side reads its own, by name, from the variable or its file.
    assert (
        service_api_key("search", {"AIMESH_SEARCH_SERVICE_API_KEY_FILE": str(key_file)}) == search
    )
    assert service_api_key("chat", {"AIMESH_SEARCH_SERVICE_API_KEY": search}) == ""


def test_database_url_is_required_and_postgres() -> None:
    with pytest.raises(ConfigError, match="AIMESH_CHAT_DATABASE_URL is required"):
        database_url("chat", {})
    with pytest.raises(ConfigError, match="postgresql://"):
        database_url("chat", {"AIMESH_CHAT_DATABASE_URL": "sqlite:///x"})
    assert (
        database_url("chat", {"AIMESH_CHAT_DATABASE_URL": "postgresql://h/db"})
        == "postgresql://h/db"
    )


def test_a_setting_may_come_from_the_file_its_FILE_variable_names(tmp_path: pathlib.Path) -> None:
    key = tmp_path / "key-encryption-key"
    key.write_text(KEK + "\n")
    environ = {"AIMESH_USER_KEY_ENCRYPTION_KEY_FILE": str(key)}
    assert load(UserSettings, environ).key_encryption_key == KEK
    # The variable itself wins; a file the kubelet left out counts as unset.
    assert (
        load(
            UserSettings, {**environ, "AIMESH_USER_KEY_ENCRYPTION_KEY": "B" * 43}
        ).key_encryption_key
        == "B" * 43
    )
    with pytest.raises(ConfigError, match="AIMESH_USER_KEY_ENCRYPTION_KEY is required"):
        load(UserSettings, {"AIMESH_USER_KEY_ENCRYPTION_KEY_FILE": str(tmp_path / "absent")})


def test_the_database_password_may_come_from_a_file(tmp_path: pathlib.Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret/with@odd:chars\n")
    environ = {
        "AIMESH_USER_DATABASE_URL": "postgresql://aimesh_user@user-db:5432/aimesh_user?sslmode=disable",
        "AIMESH_USER_DATABASE_PASSWORD_FILE": str(password),
    }
    assert database_url("user", environ) == (
        "postgresql://aimesh_user:s3cret%2Fwith%40odd%3Achars@user-db:5432/aimesh_user?sslmode=disable"
    )
    assert database_url("user", {"AIMESH_USER_DATABASE_URL": "postgresql://u:p@h/d"}) == (
        "postgresql://u:p@h/d"
    )
