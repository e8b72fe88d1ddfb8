"""A missing prerequisite skips here and fails under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, require


def test_require_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    require(True, "anything")  # present: nothing happens
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require(False, "a Redis")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="a Redis"):
        require(False, "a Redis")


def test_a_ci_run_without_redis_fails() -> None:
    environ = {**os.environ, "CI": "true", "AIMESH_TEST_REDIS_URL": "redis://127.0.0.1:1/0"}
    test = "tests/unit/test_recommend_serving.py::test_redis_cache_against_a_real_redis"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "missing prerequisite under CI=true: a Redis at redis://127.0.0.1:1/0" in run.stdout
