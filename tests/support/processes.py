"""Process helpers for tests that start Ray clusters of their own.

Each such test tags its processes with a marker in their environment and kills exactly those
at the end: ``ray stop --force`` would kill every Ray on the machine, the session's too.
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


def marked_processes(marker: str) -> list[int]:
    """The processes whose environment holds ``marker`` (``KEY=VALUE``), this one excepted."""
    if not Path("/proc/self/environ").exists():
        import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
        import psutil

        key, _, value = marker.partition("=")
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.pid != os.getpid() and proc.environ().get(key) == value:
                    found.append(proc.pid)
        return found
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                    found.append(int(name))
    return found


def stop_marked(marker: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process carrying ``marker`` until none is left; returns those still alive."""
    deadline = time.monotonic() + timeout
    while (pids := marked_processes(marker)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return marked_processes(marker)
