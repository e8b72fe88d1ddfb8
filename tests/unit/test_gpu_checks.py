"""The GPU checks run where CI never does: their --cpu-smoke runs keep them working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name,keys",
    [
        (
            "search",
            {
                "encoder_fp16_library_per_s", "encoder_fp16_group16_per_s", "encoder_fp16_per_s",
                "encoder_fp32_per_s", "encoder_fp16_batches_1_to_64_per_s",
                "torch_flat_batched_qps", "torch_flat_single_qps",
            },
        ),
        ("recommend", {"epoch_s_cpu", "serving_qps_cpu"}),
    ],
)  # fmt: skip
def test_a_gpu_check_runs_end_to_end_on_the_cpu(name: str, keys: set[str]) -> None:
    script = ROOT / "tests" / "load" / f"gpu_check_{name}.py"
    done = subprocess.run(
        [sys.executable, str(script), "--cpu-smoke"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["bench"] == f"gpu-check-{name}" and figures["gpu"] == "cpu smoke run"
    assert keys <= figures.keys()
    assert all(figures[key] > 0 for key in keys)
