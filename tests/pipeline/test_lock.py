"""The output folder's lock: who holds it, when it lapses, who may take it over."""

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from pipeline._layout import LOCK_PATH, META_DIR
from pipeline._lock import SETTLE_SECONDS, Owner, OutputLock
from pipeline._store import OutputStore
from pipeline.errors import LockLostError, OutputLockedError


def _held_by(store, **fields):
    owner = Owner.me(now=1000.0)
    store.write_json(LOCK_PATH, {**owner.to_dict(), **fields})


def test_a_lock_is_taken_renewed_and_released(tmp_path):
    store = OutputStore(str(tmp_path))
    clock = [1000.0]
    with OutputLock(store, now=lambda: clock[0]) as lock:
        held = store.read_json(LOCK_PATH)
        assert held["token"] == lock.owner.token and held["started"] == held["renewed"] == 1000.0
        clock[0] = 1030.0
        assert lock.renew() and store.read_json(LOCK_PATH)["renewed"] == 1030.0
        with pytest.raises(OutputLockedError, match=r"is in use by another run \(host .*, process \d+, started "
                                                    r"1970-01-01 00:16:40 UTC, renewed 0 s ago\)"):
            OutputLock(store, now=lambda: clock[0]).acquire()
    assert not (tmp_path / META_DIR).exists(), "a run that wrote nothing else leaves no folder behind"
    with OutputLock(OutputStore(str(tmp_path / "new" / "out"))):
        assert (tmp_path / "new" / "out" / LOCK_PATH).exists()
    assert not (tmp_path / "new" / "out").exists(), "nor the output folder it made"


def test_a_lock_on_another_host_holds_until_its_lease_lapses(tmp_path, caplog):
    store = OutputStore(str(tmp_path))
    _held_by(store, host="node-7", pid=1, renewed=1000.0, lease=120.0)
    with pytest.raises(OutputLockedError, match=r"host node-7, process 1, .* renewed 100 s ago\); wait for it to "
                                                 r"end, or choose another folder. A run that died leaves its lock"):
        OutputLock(store, now=lambda: 1100.0).acquire()
    lock = OutputLock(store, now=lambda: 1121.0)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    try:
        assert "taking over the lock of a run that ended without releasing it (host node-7, process 1" in caplog.text
        assert store.read_json(LOCK_PATH)["token"] == lock.owner.token
    finally:
        lock.release()


def test_a_dead_process_on_this_host_holds_nothing(tmp_path):
    store = OutputStore(str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _held_by(store, pid=int(ended.stdout), renewed=10**10)  # a lease far from lapsing does not matter here
    with OutputLock(store):
        pass
    # a live process whose id now names another process (its start time differs) holds nothing either
    _held_by(store, pid=os.getpid(), pid_started="0", renewed=10**10)
    with OutputLock(store):
        pass


def test_a_lock_that_cannot_be_read_is_replaced(tmp_path, caplog):
    store = OutputStore(str(tmp_path))
    (tmp_path / META_DIR).mkdir()
    (tmp_path / LOCK_PATH).write_text('{"host": ')
    with OutputLock(store) as lock:
        assert store.read_json(LOCK_PATH)["token"] == lock.owner.token
    assert "cannot be read" in caplog.text


def test_a_lock_taken_over_under_a_run_stops_it(tmp_path):
    store = OutputStore(str(tmp_path))
    lock = OutputLock(store)
    lock.acquire()
    try:
        lock.check()
        thief = {**json.loads((tmp_path / LOCK_PATH).read_text()), "token": "other", "host": "node-9", "pid": 42}
        (tmp_path / LOCK_PATH).write_text(json.dumps(thief))
        assert not lock.renew()
        with pytest.raises(LockLostError, match=r"another run took over .* \(host node-9, process 42, .*\); this "
                                                r"run stops"):
            lock.check()
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK_PATH).read_text())["token"] == "other", "the new owner's lock stays"


def test_a_lock_that_storage_cannot_read_for_a_while_is_still_this_runs(tmp_path, monkeypatch, caplog):
    # a blip during a renewal was taken for a lock gone: the run stopped, "taken over" by itself
    store = OutputStore(str(tmp_path))
    lock = OutputLock(store)
    lock.acquire()
    read = OutputStore.read_json

    def down(self, path):
        raise OSError("When reading information for key 'out/_actmap/lock.json': NETWORK_CONNECTION")

    try:
        monkeypatch.setattr(OutputStore, "read_json", down)
        with pytest.raises(OSError, match="NETWORK_CONNECTION"):  # (the renewer logs it and tries again)
            lock.renew()
        lock.check()  # not lost
        monkeypatch.setattr(OutputStore, "read_json", read)
        assert lock.renew() and lock.lost is None
        monkeypatch.setattr(OutputStore, "read_json", down)
    finally:
        lock.release()  # storage still down: the lock stays for its lease, said
    assert (tmp_path / LOCK_PATH).exists() and "cannot be read to let it go" in caplog.text


def test_a_release_that_waits_for_a_renewal_on_slow_storage_says_so(tmp_path, monkeypatch, caplog):
    # storage away: the renewal's write waits on its client's retries, and the run, told to
    # stop, said nothing for as long
    store = OutputStore(str(tmp_path))
    lock = OutputLock(store, lease=0.4)
    lock.acquire()
    write, writing = OutputStore.write_json, threading.Event()

    def slow(self, path, data):
        writing.set()
        time.sleep(3.0)
        write(self, path, data)

    monkeypatch.setattr(OutputStore, "write_json", slow)
    assert writing.wait(10), "the renewer renews every lease / 4"
    began = time.monotonic()
    with caplog.at_level(logging.WARNING):
        lock.release()
    assert time.monotonic() - began >= 2.0
    assert "letting go of the lock of " + str(tmp_path) + " waits for its renewal, which waits for the storage" in caplog.text
    assert not (tmp_path / LOCK_PATH).exists(), "let go once the renewal is done"


def test_two_runs_that_lock_object_storage_at_once_end_with_one_holder(s3, monkeypatch):
    """Object storage has no conditional write: a run that checked before another one wrote
    writes too. Each reads the lock back a while after writing it, so the first one learns it
    lost, instead of both running."""
    uri = f"s3://bucket/out?{s3}"
    first, second = OutputLock(OutputStore(uri)), OutputLock(OutputStore(uri))
    # the second writes as soon as the first's lock shows, well within the first's wait to read
    # it back, however slow the machine (a fixed sleep here failed on a loaded one)
    monkeypatch.setitem(SETTLE_SECONDS, False, 2.0)
    monkeypatch.setattr(second.store, "exists", lambda relative: False)  # it looked before the first wrote
    outcome = {}

    def take(name, lock):
        try:
            lock.acquire()
            outcome[name] = "held"
        except OutputLockedError as exc:
            outcome[name] = str(exc)

    thread = threading.Thread(target=take, args=("first", first))
    thread.start()
    deadline = time.monotonic() + 30
    while not first.store.exists(LOCK_PATH):  # the first has written its lock and waits to read it back
        assert time.monotonic() < deadline, "the first run wrote no lock"
        time.sleep(0.01)
    take("second", second)
    thread.join()
    assert outcome["second"] == "held"
    assert "was taken by another run just now" in outcome["first"]
    assert second.store.read_json(LOCK_PATH)["token"] == second.owner.token
    second.release()
    assert not second.store.exists(LOCK_PATH)


@pytest.mark.parametrize("when", ["taking", "letting go"])
def test_an_interrupt_while_the_lock_is_taken_or_let_go_comes_after_it(tmp_path, monkeypatch, when):
    # a second Ctrl-C (or SIGTERM) as a run stopped left its lock half let go: the lock file stayed
    import signal

    store = OutputStore(str(tmp_path / "out"))
    step = "create_json" if when == "taking" else "delete_file"
    original = getattr(OutputStore, step)

    def interrupted(self, *args, **kwargs):  # just after the lock file is made, or before it goes
        done = original(self, *args, **kwargs) if when == "taking" else None
        # to this thread, at once (os.kill may hand it to another thread of the process, such
        # as one of an in-process Ray's, and Python's handler runs when the main thread next looks)
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.05)
        return done if when == "taking" else original(self, *args, **kwargs)

    monkeypatch.setattr(OutputStore, step, interrupted)
    with pytest.raises(KeyboardInterrupt):
        with OutputLock(store, lease=60) as lock:
            assert when == "letting go", "the interrupt comes once the lock is taken, before the work"
            assert store.exists(LOCK_PATH) and lock.lost is None
    assert not store.exists(LOCK_PATH)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
