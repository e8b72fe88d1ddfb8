"""`scripts/bench NAME --plot`: PNGs of a bench's figures, drawn with the
matplotlib helpers of `aimesh bench --png`, written into tests/load/plots/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aimesh_cli.bench import pyplot, save

PLOTS_DIR = Path(__file__).resolve().parent / "plots"
COLOURS = {"aimesh": "tab:blue", "ray": "tab:orange", "litellm": "tab:orange",
           "procrastinate": "tab:orange", "direct": "tab:gray"}  # fmt: skip
NAMES = {"ray": "Ray Serve 2.60", "litellm": "LiteLLM proxy", "procrastinate": "procrastinate 3.10",
         "direct": "direct SDK stream", "aimesh": "aimesh"}  # fmt: skip


def batch_panel(axis: Any, buckets: list[tuple[float, float]], title: str) -> None:
    """Requests per batch-size bucket, from a Prometheus histogram's cumulative buckets."""
    finite = [(le, count) for le, count in buckets if np.isfinite(le)]
    counts = np.diff([0.0] + [count for _, count in finite])
    labels = [f"≤{le:g}" for le, _ in finite]
    axis.bar(range(len(counts)), counts, color=COLOURS["aimesh"])
    axis.set_xticks(range(len(counts)), labels, rotation=45, fontsize=8)
    axis.set_xlabel("batch size (aimesh's histogram buckets)")
    axis.set_ylabel("batches")
    axis.set_title(title)


def batch_figure(buckets: list[tuple[float, float]], path: Path, title: str) -> Path:
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4.2))
    batch_panel(axis, buckets, title)
    save(figure, path)
    return path


def sweep_figure(job: str, data: dict[str, Any], path: Path, what: str) -> Path:
    plt = pyplot()
    panels = 3 if data.get("batches") else 2
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    for side, points in data["sweep"].items():
        levels = sorted(points)
        axes[0].plot(levels, [points[n][0] for n in levels], "o-", label=NAMES[side],
                     color=COLOURS[side])  # fmt: skip
        axes[1].plot(levels, [points[n][1] for n in levels], "o-", label=NAMES[side],
                     color=COLOURS[side])  # fmt: skip
    axes[0].set_title(f"{what}: throughput")
    axes[0].set_ylabel("calls per second")
    axes[1].set_title(f"{what}: p99 latency")
    axes[1].set_ylabel("ms")
    axes[1].set_yscale("log")
    levels = sorted(next(iter(data["sweep"].values())))
    for axis in axes[:2]:
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.minorticks_off()
        axis.set_xlabel("calls in flight")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    if panels == 3:
        batch_panel(axes[2], data["batches"], f"{what}: batches aimesh formed")
    save(figure, path)
    return path


def cdf_panel(axis: Any, ttfc: dict[str, list[float]]) -> None:
    """CDFs of time to first chunk, one line per path."""
    for side, values in ttfc.items():
        ordered = np.sort(values)
        axis.plot(ordered, np.linspace(0, 1, len(ordered)), label=NAMES[side], color=COLOURS[side])
    axis.set_title("time to first chunk (CDF)")
    axis.set_xlabel("ms")
    axis.set_ylabel("share of streams")


def ttfc_figure(ttfc: dict[str, list[float]], path: Path) -> Path:
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4.2))
    cdf_panel(axis, ttfc)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    save(figure, path)
    return path


def chat_figure(data: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    cdf_panel(axes[0], data["ttfc"])
    every = np.concatenate([np.asarray(v) for v in data["added"].values()])
    bins = np.linspace(min(0.0, float(every.min())), float(np.percentile(every, 99.5)), 50)
    for side, values in data["added"].items():
        axes[1].hist(values, bins=bins, alpha=0.6, label=NAMES[side], color=COLOURS[side])
    axes[1].set_title("added over the direct stream, per triple")
    axes[1].set_xlabel("ms")
    axes[1].set_ylabel("streams")
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend()
    save(figure, path)
    return path


def notify_figure(data: dict[str, list[float]], path: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.2))
    width = 0.8 / len(data)
    for n, (side, rates) in enumerate(data.items()):
        axis.bar(np.arange(len(rates)) + n * width, rates, width, label=NAMES[side],
                 color=COLOURS[side])  # fmt: skip
    axis.set_xticks(np.arange(len(next(iter(data.values())))) + width / 2,
                    [f"round {n + 1}" for n in range(len(next(iter(data.values()))))])  # fmt: skip
    axis.set_ylabel("signed deliveries per second")
    axis.set_title("webhook deliveries, at least once")
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend()
    save(figure, path)
    return path


def write_peers(data: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for job, what in (("search", "search"), ("recommend", "recommend")):
        if data.get(job, {}).get("sweep", {}).get("aimesh"):
            written.append(sweep_figure(job, data[job], folder / f"peers-{job}.png", what))
    if "chat" in data:
        written.append(chat_figure(data["chat"], folder / "peers-chat.png"))
    if "notify" in data:
        written.append(notify_figure(data["notify"], folder / "peers-notify.png"))
    return written
