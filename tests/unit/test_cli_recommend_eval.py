"""`aimesh recommend eval` runs the recommend service's own evaluation module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_eval_runs_the_service_module_and_passes_its_arguments(tmp_path: Path) -> None:
    missing = tmp_path / "ratings.dat"
    result = subprocess.run(
        [sys.executable, "-m", "aimesh_cli", "recommend", "eval", "--file", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # The module read the file named on the CLI, and its exit status came back.
    assert result.returncode == 2, result.stderr
    assert str(missing) in result.stderr and result.stderr.startswith("aimesh: ")
