"""Child processes that lead their own process group (a Ray head, a vLLM server, the embedded services): is one
alive, and stop it with everything it started."""

from __future__ import annotations

import os
import signal
import time


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie child of ours counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not our child: kill(0) said it exists
        return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_group(pgid: int, grace: float) -> None:
    """SIGTERM the process group `pgid` (its leader's pid), wait up to `grace` seconds for the leader, then SIGKILL
    whatever is left of the group."""
    if pgid <= 0:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """`preexec_fn` of a child that must not outlive the job that started it (a vLLM server, a merge's check): on
    Linux it gets SIGTERM when its parent dies (a job killed with SIGKILL). The kernel ties this to the starting
    *thread*: start the child from a thread that lives as long as the child should."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no glibc: the child is still stopped by its owner
        return
