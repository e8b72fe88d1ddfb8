"""Peer-side programs for `scripts/bench peers`. Each runs with its peer's own
interpreter (.aimesh/peers/<name>/bin/python), never the project's."""
