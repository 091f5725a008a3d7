"""A listening socket that must never be connected to: the egress tests' witness."""

from __future__ import annotations

import socket


class Trap:
    """A listening TCP socket that must never be connected to."""

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.host, self.port = self.sock.getsockname()[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connections(self) -> int:
        """Connections the kernel queued (a connect completes without accept)."""
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1
