"""A TCP relay on loopback that a test can cut and restore: a server gone, to a client."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from tests.support.servers.tools import free_port


class Relay:
    """A TCP relay from 127.0.0.1:``port`` to ``target``, that can be cut and restored.
    ``target`` may be a function, asked anew for each connection (a Service's ready
    endpoints, as kube-proxy picks one); a connection it has none for is closed."""

    def __init__(self, target: tuple[str, int] | Callable[[], tuple[str, int]]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                target = self.target() if callable(self.target) else self.target
                upstream = socket.create_connection(target, timeout=5)
                upstream.settimeout(None)
            except (OSError, LookupError):  # no endpoint, or it refused
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and reset the open ones (kept-alive ones too)."""
        if self._listener is not None:
            # close() alone leaves a thread blocked in accept() listening on Linux.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
