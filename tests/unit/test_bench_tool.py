"""`aimesh bench`: histogram accuracy, call parsing, and a short run against a live server."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from aimesh_cli import bench
from aimesh_cli.main import build_parser
from tests.conftest import Running, admin_token


def test_histogram_percentiles_are_within_its_resolution() -> None:
    histogram = bench.Histogram()
    values = [random.Random(3).lognormvariate(-6, 1.2) for _ in range(50_000)]
    for value in values:
        histogram.record(value)
    ordered = sorted(values)
    for p in (50, 90, 99, 99.9):
        exact_ms = ordered[int(len(ordered) * p / 100) - 1] * 1000
        assert histogram.percentile_ms(p) == pytest.approx(exact_ms, rel=0.03)
    assert histogram.summary()["max"] == pytest.approx(max(values) * 1000, rel=1e-3)


def test_call_specs_parse_method_weight_and_json() -> None:
    call = bench.parse_call('aimesh.user.v1.UserService/GetUser*3={"name": "users/me"}')
    assert (call.path, call.weight, call.server_streaming) == (
        "/aimesh.user.v1.UserService/GetUser",
        3.0,
        False,
    )
    assert call.request == b"\n\x08users/me"
    assert bench.parse_call("aimesh.chat.v1.ChatService/StreamChat").server_streaming
    with pytest.raises(ValueError, match="no method"):
        bench.parse_call("aimesh.user.v1.UserService/Nope")


@pytest.mark.parametrize("mode", [["--rate", "200"], ["--concurrency", "8"]])
async def test_a_short_run_writes_json_and_png(
    user_server: Running, users: Any, tmp_path: Path, mode: list[str]
) -> None:
    token = await admin_token(users)
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    args = build_parser().parse_args(
        [
            "bench",
            "--target",
            user_server.address,
            "--call",
            'aimesh.user.v1.UserService/GetUser*3={"name": "users/me"}',
            "--call",
            "aimesh.user.v1.UserService/GetJwks",
            "--duration",
            "2",
            "--warmup",
            "0.2",
            "--token",
            token,
            "--out",
            str(out),
            *mode,
        ]
    )
    report = await bench.run(args)
    bench.plot(report, png)
    out.write_text(json.dumps(report))
    assert report["calls"] > 50 and report["ok"] > 0
    # The admin's own rate limit (200/s) may answer some calls: counted, by code.
    assert set(report["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert sum(report["codes"].values()) == report["calls"]
    assert set(report["per_method"]) == {
        "aimesh.user.v1.UserService/GetUser",
        "aimesh.user.v1.UserService/GetJwks",
    }
    mix = report["per_method"]["aimesh.user.v1.UserService/GetUser"]["calls"] / report["calls"]
    assert 0.6 < mix < 0.9  # weights 3:1
    assert len(report["timeline"]) >= 2
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert png.read_bytes()[:4] == b"\x89PNG"
