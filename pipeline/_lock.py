"""One run at a time on an output folder: a lock in ``_actmap/lock.json`` with a lease.

The lock names its owner (host, process id, the process's own start time, when the run
started) and when it was last renewed. A run renews it every quarter of the lease while it
works. Another run finds it held while its owner lives: on the same host, while that process
runs (the start time tells a process id used again); elsewhere, while the lease is renewed. A
run whose owner died (killed, crashed, its machine gone) is taken over by the next run, at once
on the same host, after the lease elsewhere. On object storage, which gives pyarrow no
conditional write, a run reads its new lock back a second after writing it: of two runs that
wrote it at once, the one whose write lost learns it then and stops.

>>> owner = Owner(host="a", pid=7, pid_started="91", started=100.0, renewed=100.0, token="x", lease=60.0)
>>> owner.describe(now=130.0)
'host a, process 7, started 1970-01-01 00:01:40 UTC, renewed 30 s ago'
>>> owner.lapsed(now=130.0), owner.lapsed(now=161.0)
(False, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._layout import LOCK_PATH, META_DIR
from ._store import OutputStore
from .config import RunSpec
from .errors import LockLostError, OutputConflictError, OutputLockedError

log = logging.getLogger(__name__)

#: Seconds a lock holds without renewal; a run renews it every quarter of that.
LEASE_SECONDS = 120.0

#: Seconds a run waits after writing the lock before it reads it back, on a local disk and on
#: object storage. Where two runs wrote it at once the last write wins, and the other reads the
#: winner's name; object stores offer pyarrow no conditional write, so every new lock there is
#: read back, a while later than another run's check and write take.
SETTLE_SECONDS = {True: 0.05, False: 1.0}

#: Seconds the release waits quietly for a renewal under way before it says why it waits.
SLOW_RELEASE = 2.0


def _process_started(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (``None`` where unknown): with the
    id, it names one process, not whichever reuses the id later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds a lock, and until when (``renewed + lease``, on the owner's clock)."""

    host: str
    pid: int
    pid_started: str | None
    started: float
    renewed: float
    token: str
    lease: float = LEASE_SECONDS

    @classmethod
    def me(cls, lease: float = LEASE_SECONDS, now: float | None = None) -> Owner:
        now = time.time() if now is None else now
        return cls(socket.gethostname(), os.getpid(), _process_started(os.getpid()), now, now,
                   uuid.uuid4().hex, lease)

    @classmethod
    def from_dict(cls, doc: Any) -> Owner:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lapsed(self, now: float) -> bool:
        """Whether the lease ran out without renewal."""
        return now - self.renewed > self.lease

    def alive(self, now: float) -> bool:
        """Whether the owner may still be at work: on this host, while its process runs; on
        another, while it renews its lease."""
        if self.host == socket.gethostname():
            if not _process_alive(self.pid):
                return False
            started = _process_started(self.pid)
            return started is None or self.pid_started is None or started == self.pid_started
        return not self.lapsed(now)

    def describe(self, now: float) -> str:
        when = datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"host {self.host}, process {self.pid}, started {when}, renewed {now - self.renewed:.0f} s ago"


class OutputLock:
    """The lock of the output ``store``: :meth:`acquire` it (or fail naming who holds it),
    check :attr:`lost` while working, :meth:`release` it at the end. A context manager."""

    def __init__(self, store: OutputStore, lease: float = LEASE_SECONDS, now: Callable[[], float] = time.time):
        self.store, self.lease, self.now = store, lease, now
        self.owner = Owner.me(lease, now())
        self.lost: Owner | None = None
        self._made_root = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _holder(self, held: bool = False) -> Owner | None:
        """Who holds the lock now (``None``: nobody; a lock that cannot be read holds nothing).
        ``held``: this run holds it, so a read that fails (storage that hiccups) is raised, not
        taken for a lock gone (a blip during a renewal ended the run, "taken over" by itself)."""
        try:
            return Owner.from_dict(self.store.read_json(LOCK_PATH))
        except FileNotFoundError:
            return None
        except OSError as exc:
            if held:
                raise
            log.warning("the lock %s cannot be read (%s); it is replaced", self.store.path(LOCK_PATH), exc)
            return None
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("the lock %s cannot be read (%s); it is replaced", self.store.path(LOCK_PATH), exc)
            return None

    def acquire(self) -> None:
        """Take the lock; :class:`OutputLockedError` when another run holds it and lives."""
        self._made_root = not self.store.root_exists
        try:
            created = self.store.create_json(LOCK_PATH, self.owner.to_dict())
        except OSError as exc:  # the first write of a run: a folder it may not make or write in
            if not (isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError))
                    or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
                raise
            raise OutputConflictError(RunSpec.key("output"), f"cannot write in {self.store.location!r}: "
                                      f"{(str(exc) or type(exc).__name__).splitlines()[0]}; choose a folder this process may create and "
                                      "write in") from None
        if not created:
            holder = self._holder()
            if holder is not None and holder.alive(self.now()):
                raise OutputLockedError(RunSpec.key("output"), f"{self.store.location!r} is in use by another run "
                                        f"({holder.describe(self.now())}); wait for it to end, or choose another "
                                        f"folder. A run that died leaves its lock, which the next run takes over: "
                                        f"at once on the same host, after {holder.lease:.0f} s without renewal "
                                        f"elsewhere (or delete {self.store.path(LOCK_PATH)})")
            if holder is not None:
                log.warning("taking over the lock of a run that ended without releasing it (%s)",
                            holder.describe(self.now()))
            self.store.write_json(LOCK_PATH, self.owner.to_dict())
        if not created or not self.store.local:  # written without a guard: read it back
            time.sleep(SETTLE_SECONDS[self.store.local])
            holder = self._holder()
            if holder is None or holder.token != self.owner.token:
                raise OutputLockedError(RunSpec.key("output"), f"{self.store.location!r} was taken by another run "
                                        f"just now ({holder.describe(self.now()) if holder else 'unknown'})")
        self._renewer = threading.Thread(target=self._renew, name="actmap-lock", daemon=True)
        self._renewer.start()

    def renew(self) -> bool:
        """Renew the lease; whether the lock is still this run's (if not, :attr:`lost` says who
        took it)."""
        holder = self._holder(held=True)
        if holder is None or holder.token != self.owner.token:
            self.lost = holder or self.owner
            return False
        self.owner = dataclasses.replace(self.owner, renewed=self.now())
        self.store.write_json(LOCK_PATH, self.owner.to_dict())
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                if not self.renew():
                    log.error("another run took over the lock of %s: %s", self.store.location,
                              self.lost.describe(self.now()))
                    return
            except OSError as exc:  # storage that hiccups: the next renewal tries again
                log.warning("renewing the lock of %s failed: %s", self.store.location, exc)

    def check(self) -> None:
        """Raise :class:`LockLostError` if another run took the lock over."""
        if self.lost is not None:
            raise LockLostError(f"another run took over {self.store.location!r} while this one ran "
                                f"({self.lost.describe(self.now())}); this run stops")

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still this run's (safe to call twice)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=SLOW_RELEASE)
            if self._renewer.is_alive():  # a renewal that waits on storage away (its client's retries)
                log.warning("letting go of the lock of %s waits for its renewal, which waits for the storage",
                            self.store.location)
                self._renewer.join()
            self._renewer = None
            try:
                holder = self._holder(held=True)
            except OSError as exc:  # (its lease runs out; a rerun on this host takes it over at once)
                log.warning("the lock of %s cannot be read to let it go (%s); it stays until its lease of %.0f s "
                            "runs out, or a rerun on this host takes it over", self.store.location, exc, self.lease)
                return
            if holder is not None and holder.token == self.owner.token:
                self.store.delete_file(self.store.path(LOCK_PATH))
                if not self.store.list_files(META_DIR):  # a run refused before it wrote anything
                    self.store.delete_dir(META_DIR)
                    if self._made_root and self.store.root_exists and not self.store.entries():
                        self.store.delete_root()

    def __enter__(self) -> OutputLock:
        try:
            with _interrupts_deferred():
                self.acquire()
        except BaseException:
            if self._renewer is not None:  # taken, then the interrupt held back came: let go of it
                self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        with _interrupts_deferred():
            self.release()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM that come during the block take effect after it: a lock is taken or
    let go whole (a second Ctrl-C as a run stops left its lock, which a rerun on another host
    takes over only when the lease ends). Signals reach Python's handlers in the main thread
    only: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    before = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in came:  # now, to the handlers put back
            signal.raise_signal(s)


def running_on(store: OutputStore, now: Callable[[], float] = time.time) -> str | None:
    """Who holds the lock of the dump in ``store`` and may still be at work (``None``: nobody)."""
    try:
        holder = Owner.from_dict(store.read_json(LOCK_PATH))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return holder.describe(now()) if holder.alive(now()) else None
