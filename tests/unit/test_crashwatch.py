"""The run fails when a process a test started crashes, though the test passed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

INNER = """
import asyncio, signal, subprocess, sys

SEGFAULT = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]
SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_crash_printed():
    subprocess.run(SEGFAULT)


def test_crash_silenced():
    subprocess.run(SEGFAULT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_crash_under_asyncio():
    process = await asyncio.create_subprocess_exec(*SEGFAULT, stderr=subprocess.DEVNULL)
    await process.wait()


def test_killed_on_purpose():
    process = subprocess.Popen(SLEEP)
    process.kill()
    assert process.wait() == -signal.SIGKILL


def test_clean_exit():
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0
"""


def test_a_crashed_child_fails_its_test(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.crashwatch", "-p", "no:cacheprovider",
         "-o", "asyncio_mode=auto", "-rA", "-q", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    lines = run.stdout.splitlines()
    for name in ("test_crash_printed", "test_crash_silenced", "test_crash_under_asyncio"):
        assert any(line.startswith(f"ERROR test_inner.py::{name}") for line in lines), run.stdout
    for name in ("test_killed_on_purpose", "test_clean_exit"):
        assert f"PASSED test_inner.py::{name}" in lines, run.stdout
    assert "died of SIGSEGV, which no test sent" in run.stdout
    assert "Fatal Python error: Segmentation fault" in run.stdout
    assert run.returncode == 1
