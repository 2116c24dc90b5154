"""Where a source's files live: a local folder or any URI ``pyarrow.fs`` opens, listed once.

>>> import os, tempfile
>>> root = tempfile.mkdtemp()
>>> for name in ("b/2.png", "a/1.jpg", "a/notes.txt"):
...     os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
...     open(os.path.join(root, name), "wb").close()
>>> list_tree(Location(root), {".jpg", ".png"}).column("path").to_pylist()
['a/1.jpg', 'b/2.png']
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import functools
import logging
import os
import posixpath
import queue
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .._secrets import cannot_use, shown
from ..errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Location:
    """A folder (or object-storage prefix) given as a local path or a URI (``s3://``, ``gs://``,
    ``file://``, ...); ``fs`` and ``root`` are what pyarrow needs to reach it, ``shown`` what a
    message may say of it."""

    def __init__(self, location: str):
        self.location = location
        self.shown = shown(location)  # as messages quote it: without the credentials it may carry
        if "://" in location:
            self.fs, self.root = pafs.FileSystem.from_uri(location)
            self.local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = os.path.abspath(os.path.expanduser(location)).replace(os.sep, "/")
            self.local = True
        self.root = self.root.rstrip("/") or "/"

    def __repr__(self) -> str:
        return f"Location({self.location!r})"

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def kind(self, relative: str = "") -> pafs.FileType:
        return self.fs.get_file_info(self.path(relative) if relative else self.root).type

    def folders(self) -> list[str]:
        """The names of the folders right under this one (links to folders too, on a local disk)."""
        if self.local:
            with os.scandir(self.root) as entries:
                return [entry.name for entry in entries if entry.is_dir() and is_utf8(entry.name)]
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return [posixpath.basename(info.path) for info in infos if info.type == pafs.FileType.Directory]

    def read(self, relative: str) -> bytes:
        """The whole file ``relative`` (plain ``open`` on local disks: fewer copies)."""
        if self.local:
            return read_local(self.path(relative))
        with self.fs.open_input_stream(self.path(relative)) as f:
            return f.read()

    def read_range(self, relative: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``relative`` from ``offset`` (one ranged request on object storage)."""
        if self.local:
            with open(self.path(relative), "rb") as f:
                f.seek(offset)
                return f.read(size)
        with self.fs.open_input_file(self.path(relative)) as f:
            return f.read_at(size, offset)


    @functools.cached_property
    def on_network(self) -> bool:
        """Whether each read waits on the network: object storage, or a local path on a network
        file system (NFS, Lustre, ...: :func:`network_mount`)."""
        return not self.local or network_mount(self.root) is not None


#: File system types (``/proc/self/mounts``) whose reads go over the network.
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph",
                                 "glusterfs", "9p", "afs", "wekafs", "orangefs", "pvfs2"})
#: FUSE file systems that are not remote: the others (s3fs, gcsfuse, sshfs, rclone, ...) are
#: taken to be, since reading a remote one as a local disk (a tar's headers one request at a
#: time) costs far more than the reverse (its headers indexed on 16 threads).
LOCAL_FUSE = frozenset({"fuseblk", *(f"fuse.{name}" for name in (
    "fuse-overlayfs", "lxcfs", "gvfsd-fuse", "portal", "xdg-document-portal", "doc",  # containers, desktops
    "squashfuse", "squashfuse_ll", "erofsfuse", "fuse-zip", "archivemount", "ratarmount", "snapfuse",  # images
    "mergerfs", "unionfs", "unionfs-fuse", "bindfs", "rofiles-fuse",  # views of local folders
    "gocryptfs", "encfs", "cryfs", "securefs",  # encrypted local folders
    "ntfs-3g", "apfs-fuse", "jmtpfs", "vmhgfs-fuse"))})  # local disks and devices


def network_mount(path: str, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the network file system that holds the local ``path`` (``None``: a local
    disk, or no mount table to say), from the mount table ``mounts``.

    >>> import tempfile
    >>> table = tempfile.NamedTemporaryFile("w", suffix=".mounts", delete=False)
    >>> _ = table.write("/dev/sda1 / ext4 rw 0 0\\nhost:/export /mnt/data nfs4 rw 0 0\\n"
    ...                 "bucket /mnt/data/s3\\\\040x fuse.s3fs rw 0 0\\n"); table.close()
    >>> [network_mount(p, table.name) for p in ("/home/me", "/mnt/data/a.tar", "/mnt/data2", "/mnt/data/s3 x/b")]
    [None, 'nfs4', None, 'fuse.s3fs']
    """
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            table = [fields[1:3] for fields in map(str.split, f) if len(fields) > 2]
    except OSError:
        return None
    path = os.path.realpath(path)
    best, kind = "", None
    for point, fs_type in table:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)  # "\040" is a space
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fs_type
    remote = kind in NETWORK_FILESYSTEMS or ((kind or "").startswith("fuse") and kind not in LOCAL_FUSE)
    return kind if remote else None


def open_location(location: str, key: str) -> Location:
    """``Location(location)``, or a :class:`ConfigError` of ``key`` that says why it cannot be
    one (a URI that does not parse, a scheme pyarrow does not know).

    >>> open_location("foo://bar/x", "source.path")
    Traceback (most recent call last):
    ...
    pipeline.errors.ConfigError: source.path: cannot use 'foo://bar/x': Unrecognized filesystem type in URI: foo://bar/x
    """
    try:
        return Location(location)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(key, cannot_use(location, exc)) from None


def missing(location: Location, what: str, kind: pafs.FileType | None = None) -> str | None:
    """Why ``location`` cannot be ``what`` (``"a folder"``, ...) when nothing is there; else None.
    ``kind``: what is there, where the caller knows it already."""
    if (location.kind() if kind is None else kind) == pafs.FileType.NotFound:
        return f"{location.shown!r} does not exist (looked for {what} at {location.root!r})"
    return None


def read_local(path: str) -> bytes:
    """The whole local file ``path``.

    Read with the operating system's calls, not ``open``: its file objects cost more than the
    read of a small file (4-5 us against 9-10 for a 2 KB file), and that Python holds the GIL
    that the decoding threads share. Read to the end, however short a read comes back.

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     _ = f.write(bytes(range(256)) * 1000); f.flush()
    ...     read_local(f.name) == bytes(range(256)) * 1000
    True
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        parts = [os.read(fd, _READ_SIZE)]
        if len(parts[0]) == _READ_SIZE:  # a large file: again from its start, in one read of its size
            os.lseek(fd, 0, os.SEEK_SET)
            parts = [os.read(fd, os.fstat(fd).st_size + 1)]
        while parts[-1]:  # to the end, however short a read comes back
            parts.append(os.read(fd, _READ_SIZE))
        return parts[0] if len(parts) <= 2 else b"".join(parts)
    except OSError as exc:  # a folder in the file's place: say which, as ``open`` would
        exc.filename = exc.filename or path
        raise
    finally:
        os.close(fd)


_READ_SIZE = 1 << 16  # a small image in one read


def _walk_local(root: str) -> tuple[list[str], list[str]]:
    """The relative paths of the regular files under ``root``, sorted as strings, with no sort
    of the whole list and no ``stat`` per file (the directory entries say which are files);
    and those of the links that lead nowhere (their target gone).

    Each folder's entries are sorted, a folder's name with its ``/``, and a folder's files
    come where its name sorts: the order of the walk is the order of the paths (``a-b.png``
    before ``a/x.png``, as ``-`` sorts before ``/``). A link to a folder is followed unless it
    leads into the tree (whose files are listed by their own paths; a link to a folder above
    would loop for ever) or to a folder already listed: each file is listed once.
    """
    paths: list[str] = []
    stack: list[tuple[str, Iterator[str]]] = []
    inside = os.path.realpath(root)
    seen = {_identity(os.stat(root))}
    skipped: list[str] = []
    dangling: list[str] = []

    def enter(prefix: str) -> None:
        keys, folders = _sorted_entries(os.path.join(root, prefix) if prefix else root, prefix, inside, seen, skipped,
                                        dangling)
        if folders:  # taken key by key below: its folders' files come in between
            stack.append((prefix, iter(keys)))
        else:
            paths.extend([prefix + key for key in keys])

    enter("")
    while stack:
        prefix, keys = stack[-1]
        for key in keys:
            if key[-1] == "/":
                enter(prefix + key)
                break
            paths.append(prefix + key)
        else:
            stack.pop()
    if skipped:
        log.warning("%d link(s) to folders under %s are not followed: they lead into the folder itself (its files "
                    "are listed by their own paths) or to a folder already listed, e.g. %r", len(skipped), root,
                    skipped[0])
    return paths, dangling


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _sorted_entries(folder: str, prefix: str, inside: str, seen: set, skipped: list[str],
                    dangling: list[str]) -> tuple[list[str], bool]:
    """The names of the files in ``folder`` and of its folders (with a ``/`` after), sorted;
    and whether there are folders. A folder already ``seen``, or a link into ``inside``, is
    left out (its path added to ``skipped``), as is a link that leads nowhere (to ``dangling``)."""
    keys, found = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file():
                keys.append(entry.name)
            elif entry.is_dir():
                found.append(entry)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                dangling.append(prefix + entry.name)
    files = len(keys)
    for entry in sorted(found, key=lambda e: e.name + "/"):  # of two links to one folder, the first in path order
        if entry.is_symlink():
            real = os.path.realpath(entry.path)
            if real == inside or real.startswith(inside.rstrip("/") + "/"):
                skipped.append(prefix + entry.name)
                continue
        identity = _identity(entry.stat())
        if identity in seen:
            skipped.append(prefix + entry.name)
            continue
        seen.add(identity)
        keys.append(entry.name + "/")
    keys.sort()
    return keys, len(keys) > files


def glob_names(names: Iterable[str], pattern: str, skip: tuple[str, ...] = (".",)) -> list[str]:
    """The ``names`` the glob ``pattern`` matches (case counts), sorted; as a shell's glob, a
    name that starts with one of ``skip`` (``.``: macOS's ``._x.tar`` copies) only where the
    pattern starts with it too.

    >>> glob_names(["b-1.tar", "._b-1.tar", "a-2.tar"], "*.tar")
    ['a-2.tar', 'b-1.tar']
    >>> glob_names(["._b-1.tar", "_SUCCESS"], "._*"), glob_names(["_SUCCESS"], "*", skip=(".", "_"))
    (['._b-1.tar'], [])
    """
    hidden = tuple(prefix for prefix in skip if not pattern.startswith(prefix))
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern) and not n.startswith(hidden))


def no_match(pattern: str, files: Iterable[str], folders: Iterable[str] = (), skip: tuple[str, ...] = (".",)) -> str:
    """Why the glob ``pattern`` took none of a folder's ``files``: what it matched but left out
    (names that start with one of ``skip``), or that it matches folders, which it does not take.

    >>> print(no_match("*.tar", ["._a.tar"]))
    its files whose names start with '.' are left out ('._a.tar'): start the pattern so to take them
    >>> print(no_match("label=*", [], ["label=0"]))
    it matches folders ('label=0'), and a glob takes files: name the folder above them
    """
    hidden = [n for n in files if fnmatch.fnmatchcase(n, pattern)]
    if hidden:
        starts = " or ".join(repr(p) for p in skip)
        return f"its files whose names start with {starts} are left out ({hidden[0]!r}): start the pattern so to take them"
    matched = [n for n in folders if fnmatch.fnmatchcase(n, pattern)]
    if matched:
        return f"it matches folders ({matched[0]!r}), and a glob takes files: name the folder above them"
    return ""


def is_utf8(name: str) -> bool:
    """Whether ``name`` has a UTF-8 form (a name the OS gave as bytes that are not keeps them as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nameable(relative: str) -> bool:
    return all(part not in ("", ".", "..") for part in relative.split("/"))


def list_tree(location: Location, suffixes: Iterable[str] | None = None) -> pa.Table:
    """The files under ``location`` whose suffix is in ``suffixes`` (any case), as a table of
    ``path`` (relative, ``/``-separated) and ``size``, sorted by path: the file's index.

    ``size`` comes where the listing gives it for free (object storage); on a local disk it is
    null, since it would cost a ``stat`` per file, several times the listing itself.
    """
    if location.local:
        names, dangling = _walk_local(location.root)
        if suffixes is not None:
            kinds = {s.lower().lstrip(".") for s in suffixes}
            dangling = [n for n in dangling if posixpath.splitext(n)[1].lower().lstrip(".") in kinds]
        if dangling:
            log.warning("%d link(s) under %s lead nowhere (their target is gone) and are left out, e.g. %r",
                        len(dangling), location.shown, dangling[0])
        try:
            paths = pa.array(names, pa.string())
        except UnicodeEncodeError:  # names that are not UTF-8 (os keeps their bytes as surrogates)
            kept = [n for n in names if is_utf8(n)]
            log.warning("%d file name(s) under %s are not UTF-8 and are left out, e.g. %r", len(names) - len(kept),
                        location.shown, next(n for n in names if not is_utf8(n)))
            paths = pa.array(kept, pa.string())
        sizes = pa.nulls(len(paths), pa.int64())
    else:
        infos = location.fs.get_file_info(pafs.FileSelector(location.root, recursive=True))
        prefix = len(location.root) + 1
        files = [i for i in infos if i.type == pafs.FileType.File]
        # keys with an empty, "." or ".." part (a//b.png) are objects no path can name
        unnamed = [i.path[prefix:] for i in files if not _nameable(i.path[prefix:])]
        if unnamed:
            log.warning("%d object(s) under %s have a key with an empty, '.' or '..' part, which no path "
                        "reaches, and are left out, e.g. %r", len(unnamed), location.shown, unnamed[0])
            files = [i for i in files if _nameable(i.path[prefix:])]
        paths = pa.array([i.path[prefix:] for i in files], pa.string())
        sizes = pa.array([i.size for i in files], pa.int64())
    table = pa.table({"path": paths, "size": sizes})
    if not location.local:  # the local walk gives the paths sorted already
        table = table.take(pc.sort_indices(table, [("path", "ascending")]))
    if suffixes is not None:  # one vectorised pass: cheaper than a test per name in Python
        wanted = "|".join(re.escape(s.lower().lstrip(".")) for s in sorted(suffixes))
        table = table.filter(pc.match_substring_regex(table.column("path"), f"(?i)\\.({wanted})$"))
    return table


def ordered_map(executor: Executor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[Future]:
    """``fn`` over ``items`` on ``executor``, at most ``window`` at once, futures in order.

    The caller takes each future's result (or exception) as it comes; the items ahead of it
    are already running, so reading overlaps the caller's work while memory stays bounded.

    >>> from concurrent.futures import ThreadPoolExecutor
    >>> with ThreadPoolExecutor(2) as pool:
    ...     [f.result() for f in ordered_map(pool, lambda x: x * x, range(5), window=2)]
    [0, 1, 4, 9, 16]
    """
    pending: collections.deque[Future] = collections.deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:  # the caller stopped early: what has not started need not run
        for future in pending:
            future.cancel()


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """The items of ``items``, taken by a thread of their own up to ``depth`` ahead of the
    caller: the waits of a remote read overlap the caller's work on the items before, and
    memory stays bounded. An exception comes when its item would have; a caller that stops
    early stops the thread, and ``items`` is closed in it.

    >>> list(read_ahead(iter(range(5)), depth=2))
    [0, 1, 2, 3, 4]
    """
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stopping = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stopping.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stopping.is_set():
                    return
            ready.put((done, None))
        except BaseException as exc:  # handed to the caller, raised where the item would have come
            ready.put((done, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="actmap-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stopping.set()
        while thread.is_alive():  # unblock a put, then wait for the thread to close ``items``
            with contextlib.suppress(queue.Empty):
                ready.get_nowait()
            thread.join(timeout=0.05)
