"""pgserver's user switch happens after exec (setpriv), never in a forked child
of this process: beside busy gRPC threads that child crashed (issue 17, item 7)."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from aimesh_cli.embedded_pg import switch_users_after_exec


def test_pg_commands_switch_users_with_setpriv(monkeypatch: pytest.MonkeyPatch) -> None:
    from pgserver import _commands

    switch_users_after_exec()  # as tests/conftest.py does; idempotent
    calls: list[tuple[list[str], dict[str, Any]]] = []

    def recording(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append((args, kwargs))
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(subprocess, "run", recording)
    _commands.pg_ctl(["--version"], pgdata="/nonexistent", user="root")  # type: ignore[attr-defined]
    ((args, kwargs),) = calls
    assert "user" not in kwargs  # so CPython may vfork: no Python code in the child
    assert os.path.basename(args[0]) == "setpriv" and "--reuid=0" in args
    assert args[args.index("--") + 1].endswith("/pg_ctl")
