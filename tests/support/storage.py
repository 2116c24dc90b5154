"""Test data on other filesystems, and what a read costs."""

from __future__ import annotations

from pathlib import Path


def upload(local: str | Path, uri: str) -> None:
    """Copy the local folder ``local`` to ``uri`` (a folder or prefix on any pyarrow filesystem)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(str(local), root, destination_filesystem=fs)


def bytes_read() -> int:
    """Bytes this process has read through read() and pread() so far (Linux ``/proc/self/io``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar line")


def on_network_mount(monkeypatch, folder: str | Path, kind: str = "nfs") -> None:
    """Have the sources take the local ``folder`` for a mount of a network file system ``kind``
    (as ``/proc/self/mounts`` would say)."""
    from pipeline._sources import _files

    table = Path(folder).parent / f".{Path(folder).name}.mounts"
    table.write_text(f"/dev/sda1 / ext4 rw 0 0\nhost:/export {Path(folder).resolve()} {kind} rw 0 0\n")
    real = _files.network_mount
    monkeypatch.setattr(_files, "network_mount", lambda path: real(path, str(table)))


class Outage:
    """A TCP relay to ``port`` on 127.0.0.1 that can go away: clients connect to :attr:`port`;
    while :meth:`down`, every connection is closed, new ones as soon as they come (storage that
    is away, as a network or an endpoint that fails is), until :meth:`up`. The relay keeps its
    port all along: no other server can take it meanwhile.

    >>> import socket
    >>> with socket.create_server(("127.0.0.1", 0)) as target, Outage(target.getsockname()[1]) as relay:
    ...     client = socket.create_connection(("127.0.0.1", relay.port)); peer, _ = target.accept()
    ...     _ = client.sendall(b"ping"); peer.recv(4)
    ...     relay.down(); client.recv(4)
    ...     socket.create_connection(("127.0.0.1", relay.port)).recv(4)
    b'ping'
    b''
    b''
    """

    def __init__(self, target: int):
        import socket
        import threading

        self.target, self._socket, self._threading = target, socket, threading
        self._lock = threading.Lock()
        self._open: set = set()
        self.away = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed: the relay is done
            if self.away:
                self._close(client)
                continue
            server = self._socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            self._close(end)

    def _close(self, end) -> None:
        with self._lock:
            self._open.discard(end)
        try:
            end.shutdown(self._socket.SHUT_RDWR)
        except OSError:
            pass
        end.close()

    def down(self) -> None:
        self.away = True
        with self._lock:
            ends = list(self._open)
        for end in ends:
            self._close(end)

    def up(self) -> None:
        self.away = False

    def __enter__(self) -> Outage:
        return self

    def __exit__(self, *exc) -> None:
        self.down()
        self._listener.close()
