"""Fail the run when a process the tests started crashes, even if its test passed.

Every subprocess.Popen (asyncio's subprocesses are Popen objects too) is
recorded. A test fails in its teardown when a process it started ended on a
signal that nobody here sent it (SIGSEGV, SIGABRT, an unexpected SIGKILL), or
when its captured output holds a fatal error. Python children get
PYTHONFAULTHANDLER=1, so a crash prints "Fatal Python error" and the stacks.
Processes reaped only after their test are checked when the session ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from typing import Any

import pytest

FATAL = re.compile(r"Fatal Python error|Segmentation fault|core dumped|AddressSanitizer")

_started: list[subprocess.Popen[Any]] = []
_checked: set[int] = set()
_sent: dict[int, set[int]] = {}  # pid -> signals this process sent it
_originals: dict[str, Any] = {}


def _record_init(self: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
    _originals["init"](self, *args, **kwargs)
    _started.append(self)


def _record_send_signal(self: subprocess.Popen[Any], sig: int) -> None:
    _sent.setdefault(self.pid, set()).add(int(sig))
    _originals["send_signal"](self, sig)


def _record_kill(pid: int, sig: int) -> None:
    _sent.setdefault(pid, set()).add(int(sig))
    _originals["kill"](pid, sig)


def _record_killpg(pgid: int, sig: int) -> None:
    _sent.setdefault(pgid, set()).add(int(sig))  # a group leader's pid is its group id
    _originals["killpg"](pgid, sig)


def crash_of(process: subprocess.Popen[Any]) -> str | None:
    """Why `process` counts as crashed, or None. Reads only the status that its
    owner collected: polling here would reap a child asyncio is waiting for."""
    code = process.returncode
    if code is None or code >= 0:
        return None
    if -code in _sent.get(process.pid, set()):
        return None
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"process {process.pid} ({_describe(process)}) died of {name}, which no test sent"


def _describe(process: subprocess.Popen[Any]) -> str:
    args = process.args
    words = [str(a) for a in args] if isinstance(args, list | tuple) else [str(args)]
    return " ".join(words)[:160]


def _new_crashes() -> list[str]:
    found = []
    for process in _started:
        if id(process) in _checked or process.returncode is None:
            continue
        _checked.add(id(process))
        if (crash := crash_of(process)) is not None:
            found.append(crash)
    return found


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    _originals.update(
        init=subprocess.Popen.__init__,
        send_signal=subprocess.Popen.send_signal,
        kill=os.kill,
        killpg=os.killpg,
    )
    subprocess.Popen.__init__ = _record_init  # type: ignore[method-assign]
    subprocess.Popen.send_signal = _record_send_signal  # type: ignore[method-assign]
    os.kill = _record_kill
    os.killpg = _record_killpg


def pytest_unconfigure(config: pytest.Config) -> None:
    if _originals:
        subprocess.Popen.__init__ = _originals["init"]  # type: ignore[method-assign]
        subprocess.Popen.send_signal = _originals["send_signal"]  # type: ignore[method-assign]
        os.kill = _originals["kill"]
        os.killpg = _originals["killpg"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when != "teardown":
        return report
    problems = _new_crashes()
    problems += [
        f"{title}: a fatal error was printed:\n{text[-2000:]}"
        for title, text in report.sections
        if FATAL.search(text)
    ]
    if problems and not report.failed:
        report.outcome = "failed"
        report.longrepr = "\n".join(problems)
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Children that ended unreaped after their test: collect their status now.
    for process in _started:
        if process.returncode is None:
            process.poll()
    if problems := _new_crashes():
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("\n".join(["crashed after their tests:", *problems]), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
