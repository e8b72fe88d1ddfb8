"""`aimesh up --observe`: a Prometheus from PATH scraping the local platform.

The scrape config is generated from the processes `aimesh up` started: each
service's HTTP side port (/metrics) and the edge's stats listener
(/stats/prometheus), so the Grafana dashboard's queries can be run locally.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from aimesh_cli import local


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def scrape_config(
    jobs: Mapping[str, Sequence[str]], edge_stats: str | None, interval_s: float
) -> dict[str, object]:
    """Prometheus config: one job per service (its targets host:port), and the edge."""
    scrape_configs: list[dict[str, object]] = [
        {"job_name": job, "static_configs": [{"targets": list(targets)}]}
        for job, targets in jobs.items()
    ]
    if edge_stats:
        scrape_configs.append(
            {
                "job_name": "edge",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [edge_stats]}],
            }
        )
    interval = f"{max(1, round(interval_s))}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": scrape_configs,
    }


def start(
    binary: str, config: Mapping[str, object], folder: Path, port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(
    process: subprocess.Popen[bytes], port: int, log_path: Path, timeout_s: float = 60.0
) -> None:
    local.wait_http_ready(
        process, "prometheus", f"http://127.0.0.1:{port}/-/ready", log_path, timeout_s, 0.2
    )
