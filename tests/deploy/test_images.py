"""Dockerfiles are hadolint-clean and install only their own service's extra;
compose.yaml wires every service to its own database and to the gateway."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.conftest import ROOT

IMAGES = ROOT / "services" / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
HADOLINT = shutil.which("hadolint", path=str(ROOT / ".venv" / "bin")) or "hadolint"
SERVICES = ("user", "search", "recommend", "chat", "notify")


def test_every_service_has_its_images() -> None:
    names = {path.name for path in DOCKERFILES}
    assert {f"{s}.Dockerfile" for s in SERVICES} | {
        "search-gpu.Dockerfile",
        "recommend-gpu.Dockerfile",
    } == names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: pathlib.Path) -> None:
    result = subprocess.run(
        [HADOLINT, "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_non_root_own_extra_only(dockerfile: pathlib.Path) -> None:
    text = dockerfile.read_text()
    service = dockerfile.name.split(".")[0].removesuffix("-gpu")
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert re.search(r"^USER 10001", text, re.M)
    installs = re.findall(r'pip install \./protos "\.(\[[a-z,]+\])?"', text)
    extra = {"search": "[search]", "recommend": "[recommend]", "chat": "[chat]"}.get(service, "")
    assert installs == [extra]
    if dockerfile.name.endswith("-gpu.Dockerfile"):
        assert "nvidia/cuda" in text and "whl/cu" in text
    else:
        assert "nvidia" not in text


def test_compose_has_everything() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"gateway", "jaeger", "prometheus"} <= set(services)
    for name in SERVICES:
        service = services[name]
        assert (ROOT / service["build"]["dockerfile"]).exists()
        url = service["environment"][f"AIMESH_{name.upper()}_DATABASE_URL"]
        assert f"@{name}-db:5432/aimesh_{name}" in url
        assert services[f"{name}-db"]["image"].startswith("postgres:")
    mounts = " ".join(services["gateway"]["volumes"])
    assert "gateway_envoy/envoy.yaml" in mounts and "descriptor_set.binpb" in mounts
    # Each service that relays its outbox sends its own key, the one the user
    # service bootstraps that service's account with; no two share one.
    user_env = services["user"]["environment"]
    keys = []
    for name in SERVICES:
        env = services[name]["environment"]
        if name == "user" or "AIMESH_NOTIFY_ADDRESS" not in env:
            continue
        own = env[f"AIMESH_{name.upper()}_SERVICE_API_KEY"]
        assert own == user_env[f"AIMESH_USER_BOOTSTRAP_{name.upper()}_SERVICE_API_KEY"]
        keys.append(own)
        assert "AIMESH_SERVICE_API_KEY" not in env
    assert len(keys) == 3 and len(set(keys)) == 3
