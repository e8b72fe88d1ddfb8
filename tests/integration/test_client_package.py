"""The light client package, installed alone into a fresh venv, calls a live service."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT, Running

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, json, sys

    import grpc
    from aimesh.search.v1 import search_service_pb2_grpc  # the import path apps use
    from aimesh.user.v1 import user_service_pb2, user_service_pb2_grpc
    from aimesh.webhooks import verify

    async def main(address):
        async with grpc.aio.insecure_channel(address) as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            jwks = await users.GetJwks(user_service_pb2.GetJwksRequest())
            try:
                await users.Register(user_service_pb2.RegisterRequest(email="bad", password="x"))
                code = "OK"
            except grpc.aio.AioRpcError as error:
                code = error.code().name
        heavy = [m for m in ("torch", "faiss", "asyncpg", "aimesh_runtime", "sentence_transformers")
                 if importlib.util.find_spec(m) is not None]
        print(json.dumps({"kids": len(jwks.keys), "bad_register": code, "heavy": heavy,
                          "search_stub": hasattr(search_service_pb2_grpc, "SearchServiceStub"),
                          "webhooks": callable(verify)}))

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_wheel_in_fresh_venv_calls_live_service(user_server: Running, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT / "protos"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(dist.glob("aimesh_api-*.whl"))
    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(fresh)
    python = fresh / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert install.returncode == 0, install.stderr
    (tmp_path / "client.py").write_text(CLIENT_SCRIPT)
    # In a thread: the live server runs on this test's event loop.
    result = await asyncio.to_thread(
        subprocess.run,
        [str(python), str(tmp_path / "client.py"), user_server.address],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {
        "kids": report["kids"],
        "bad_register": "INVALID_ARGUMENT",
        "heavy": [],
        "search_stub": True,
        "webhooks": True,
    }
    assert report["kids"] >= 1
    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.lower()
    assert "torch" not in installed and "faiss" not in installed and "asyncpg" not in installed
