"""Garbage-collector settings for a long-running process, applied once it has
started: servers and workers alike."""

from __future__ import annotations

import gc

FIRST_GENERATION_THRESHOLD = 10_000  # CPython's default is 700


def settle_collector() -> None:
    """What startup built (modules, descriptors, settings) lives as long as the
    process, so it is frozen and the collector's full passes stop rescanning
    it. Unfrozen, recommend under load paused its event loop ~100 ms per full
    pass (225k objects), about once a second. A larger first generation lets a
    call's short-lived objects die before a pass instead of being promoted."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(FIRST_GENERATION_THRESHOLD, *gc.get_threshold()[1:])
