"""Process helpers for tests that start Ray clusters of their own.

Each such test starts its cluster in a session of its own (``start_new_session=True``: the
daemons and workers stay in it), tags the processes with a marker in their environment, and
kills exactly those at the end: ``ray stop --force`` would kill every Ray on the machine, the
session's too. Both, since either alone can miss a process: one may start a session of its own,
and one that renames itself (Ray's dashboard agent and workers) may overwrite the environment
that ``/proc`` shows; a dashboard agent left behind that way was seen to spin on a CPU for a
minute after its cluster was gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _has_marker(pid: int, marker: str) -> bool:
    if Path("/proc/self/environ").exists():
        with contextlib.suppress(OSError):
            return marker.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return False
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
    import psutil

    key, _, value = marker.partition("=")
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).environ().get(key) == value
    return False


def _in_session(pid: int, session: int | None) -> bool:
    if session is None:
        return False
    try:
        if os.getsid(pid) != session:
            return False
        stat = Path(f"/proc/{pid}/stat")
        # a process killed already but not yet reaped by its new parent is dead, not left behind
        return not stat.exists() or stat.read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def marked_processes(marker: str, session: int | None = None) -> list[int]:
    """The processes whose environment holds ``marker`` (``KEY=VALUE``), or that belong to the
    session ``session`` (the process id of its leader), this one excepted."""
    if Path("/proc").is_dir():
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    else:
        import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
        import psutil

        pids = psutil.pids()
    return [pid for pid in pids
            if pid != os.getpid() and (_in_session(pid, session) or _has_marker(pid, marker))]


def stop_marked(marker: str, session: int | None = None, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process :func:`marked_processes` finds until none is left; returns those
    still alive."""
    deadline = time.monotonic() + timeout
    while (pids := marked_processes(marker, session)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return marked_processes(marker, session)
