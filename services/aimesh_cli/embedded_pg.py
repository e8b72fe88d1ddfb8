"""Run the embedded PostgreSQL's commands safely from a process with gRPC threads.

As root, pgserver runs initdb and pg_ctl as its own system user through
subprocess.run(user=...). CPython then forks (it uses vfork only without a user
switch) and calls setreuid in the child before exec. In a process whose gRPC
threads are busy, that child crashes before exec: in a test of 300 such runs
beside a loaded grpc.aio server, 88 died of SIGSEGV or SIGBUS, printing
"Fatal Python error" with the parent's thread stacks through an inherited
faulthandler (the crash seen in the test suite); pgserver then falls back to
killing the server. `setpriv` switches the user after exec instead, so Python
spawns it with vfork and the child runs none of the parent's code (0 crashes
in 300).
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
from types import SimpleNamespace
from typing import Any


def switch_users_after_exec() -> None:
    """Make pgserver switch users with setpriv rather than in a forked child.
    Idempotent; a no-op where setpriv is missing (pgserver's own way stays)."""
    from pgserver import _commands

    setpriv = shutil.which("setpriv")
    if setpriv is None or getattr(_commands, "switches_after_exec", False):
        return

    def run(args: list[str], *, user: str | None = None, **kwargs: Any) -> Any:
        if user is not None:
            account = pwd.getpwnam(user)
            args = [
                setpriv,
                f"--reuid={account.pw_uid}",
                f"--regid={account.pw_gid}",
                "--init-groups",
                "--",
                *args,
            ]
        return subprocess.run(args, **kwargs)

    # pgserver's commands call subprocess.run through their module's global.
    shim = SimpleNamespace(run=run, CalledProcessError=subprocess.CalledProcessError)
    setattr(_commands, "subprocess", shim)  # noqa: B010
    setattr(_commands, "switches_after_exec", True)  # noqa: B010
