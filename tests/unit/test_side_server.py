"""The side HTTP server's thread never outlives its process's Python code: a
daemon thread still in socketserver.serve_forever at finalization is ended
with pthread_exit (CPython gh-87135)."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

from aimesh_runtime.httpside import SideServer
from tests.conftest import ROOT

# Starts a side server and never stops it; the first atexit hook registered
# runs last, so it sees what finalization would see.
FORGOTTEN = """
import atexit, threading
atexit.register(lambda: print([t.name for t in threading.enumerate() if t.name == "aimesh-http"]))
from aimesh_runtime.httpside import SideServer
SideServer("127.0.0.1", 0, {}).start()
"""


def test_a_side_server_never_stopped_is_stopped_before_finalization() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FORGOTTEN],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_stop_waits_for_the_serving_thread_and_may_be_repeated() -> None:
    server = SideServer("127.0.0.1", 0, {"/ping": lambda: ("text/plain", b"pong")})
    server.start()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/ping", timeout=5) as reply:
        assert reply.read() == b"pong"
    server.stop()
    assert not server.serving
    server.stop()
