"""Encoder copies in child processes (aimesh_runtime.child_process), one per lane.

As threads beside the event loop, the copies' tokenizing and the model's
Python-level forward wait on the loop's interpreter lock; each child has its
own. Messages: ("describe") answered by the model's name, dimension and window,
and ("encode", texts) by the unit vectors and the truncated flags, computed by
the same Encoder.encode as in-process copies. A child that dies or stops
answering fails its batch with UNAVAILABLE (ENCODER_FAILED) and is started
again for the next.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from aimesh_runtime.child_process import ChildFailed, ChildProcess, Message, detach, serve
from aimesh_runtime.errors import Unavailable
from aimesh_search.encoder import Encoded, EncoderInfo

# Allowed per text beyond the base timeout: 256 texts of a full window took
# 22.9 s on one thread of a 2-vCPU EPYC (0.09 s each), and a busy machine is slower.
SECONDS_PER_TEXT = 0.5


class EncoderFailed(Unavailable):
    """An encoder process failed this batch; a retry runs on a new one."""

    reason = "ENCODER_FAILED"


class EncoderProcess(ChildProcess):
    """The parent side of one copy: `encode` is its lane's remote function."""

    def __init__(
        self, model_path: str, model_name: str, torch_threads: int, timeout_s: float = 60.0
    ) -> None:
        super().__init__(
            "aimesh_search.encoder_process",
            model_path,
            model_name,
            str(torch_threads),
            name="encoder",
            timeout_s=timeout_s,
        )

    async def describe(self) -> EncoderInfo:
        """What the child serves; its first call waits for the model to load."""
        reply = await self._request(("describe",))
        return EncoderInfo(*reply[1:5])

    async def encode(self, texts: list[str]) -> Encoded:
        reply = await self._request(("encode", texts), len(texts) * SECONDS_PER_TEXT)
        return Encoded(reply[1], reply[2])

    async def _request(self, message: Message, extra_s: float = 0.0) -> Message:
        try:
            return await self.ask(lambda: [message], self.timeout_s + extra_s)
        except ChildFailed as error:
            raise EncoderFailed(str(error)) from error


def main() -> None:
    detach()
    model_path, name, torch_threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    import torch

    from aimesh_search.encoder import Encoder

    if torch_threads:
        torch.set_num_threads(torch_threads)
    encoder = Encoder(model_path, name, "cpu")

    def handle(message: Message) -> Sequence[Any]:
        if message[0] == "describe":
            info = encoder.info
            return info.name, info.dimension, info.max_tokens, info.device
        if message[0] == "encode":
            encoded = encoder.encode(message[1])
            return encoded.vectors, encoded.truncated
        raise ValueError(f"unknown message {message[0]!r}")

    serve(handle)


if __name__ == "__main__":
    main()
