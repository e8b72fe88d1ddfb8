"""Fixtures for the deploy checks: the repository root and a scratch copy of the
deploy config that a test may break."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Callable

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DESCRIPTOR = pathlib.Path("protos/aimesh/descriptor_set.binpb")


@pytest.fixture
def mesh_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    """The deploy config, the Dockerfiles and the descriptor set, copied to edit freely."""
    for folder in ("k8s", "istio", "gateway_envoy", "services/images"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    (tmp_path / DESCRIPTOR).parent.mkdir(parents=True)
    shutil.copy(ROOT / DESCRIPTOR, tmp_path / DESCRIPTOR)
    return tmp_path


@pytest.fixture
def edit(mesh_copy: pathlib.Path) -> Callable[[str, str, str], None]:
    """Replace text in one file of the copy; the text must be there."""

    def replace(relative: str, old: str, new: str) -> None:
        path = mesh_copy / relative
        text = path.read_text()
        assert old in text, f"{old!r} not in {relative}"
        path.write_text(text.replace(old, new, 1))

    return replace
