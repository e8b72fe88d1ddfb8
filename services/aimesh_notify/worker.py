"""`python -m aimesh_notify.worker`: the delivery worker as a process of its own.

It reads the same settings as the service (AIMESH_NOTIFY_DATABASE_URL and
AIMESH_NOTIFY_*, the secret encryption key included), migrates the database
and seals plaintext secrets if the service has not yet, and drains the queue
until SIGTERM or SIGINT. Any number of workers, in processes or in
service replicas, may share one queue. Run the service with
AIMESH_NOTIFY_WORKER_CONCURRENCY=0 to leave delivery to these processes;
`--concurrency` then sets theirs. `--metrics-port` serves Prometheus metrics
of this worker's attempts (the service reports the queue's depth and lag).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from aimesh_notify.delivery_store import DeliveryStore
from aimesh_notify.events import Bell
from aimesh_notify.metrics import DeliveryMetrics
from aimesh_notify.netguard import NetworkGuard
from aimesh_notify.queue import DeliveryWorker, WebhookSender
from aimesh_notify.sealing import SecretBox, seal_at_rest
from aimesh_notify.settings import NotifySettings
from aimesh_notify.store import SubscriptionStore
from aimesh_runtime import db
from aimesh_runtime.collector import settle_collector
from aimesh_runtime.config import ConfigError, database_url, load
from aimesh_runtime.telemetry import configure_logging

log = logging.getLogger("aimesh_notify.worker")
DEFAULT_CONCURRENCY = 64
READY = "notify worker ready"


async def run(
    environ: Mapping[str, str], concurrency: int | None, metrics_port: int | None = None
) -> None:
    settings = load(NotifySettings, environ)
    url = database_url("notify", environ)
    workers = concurrency or settings.worker_concurrency or DEFAULT_CONCURRENCY
    pool = await db.create_pool(url, max_size=4)
    await db.migrate(pool, Path(__file__).parent / "migrations")
    box = SecretBox(settings.secret_key_bytes(), settings.previous_key_bytes())
    await seal_at_rest(
        SubscriptionStore(pool), box, strict=True
    )  # a missing key stops the worker here
    bell = Bell(url)
    sender = WebhookSender(NetworkGuard(settings.allow_private_webhooks), workers)
    registry = CollectorRegistry()
    metrics = DeliveryMetrics(registry)
    worker = DeliveryWorker(
        DeliveryStore(pool), sender, bell, settings, box, concurrency=workers, metrics=metrics
    )
    exporter = None
    if metrics_port is not None:
        try:
            exporter, _ = start_http_server(metrics_port, registry=registry)
        except OSError as error:
            raise ConfigError(f"--metrics-port {metrics_port}: {error}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(bell.listen_forever()), asyncio.create_task(worker.run())]
    settle_collector()
    log.info(
        READY,
        extra={
            "concurrency": workers,
            "metrics_port": exporter.server_port if exporter is not None else None,
        },
    )
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await sender.close()
        await bell.close()
        await pool.close()
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aimesh_notify.worker")
    parser.add_argument("--concurrency", type=int, help="attempts in flight at once")
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free one)"
    )
    args = parser.parse_args(argv)
    try:
        configure_logging("notify-worker", os.environ.get("AIMESH_LOG_LEVEL", "INFO"))
        asyncio.run(run(os.environ, args.concurrency, args.metrics_port))
    except ConfigError as error:
        print(f"aimesh: configuration error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
