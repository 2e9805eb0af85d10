"""Bind the socket (so a port in use is one clear error) and run uvicorn on it."""

from __future__ import annotations

import socket

from toolkit.errors import UserError


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address this machine can bind ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it each SSE event
    # after the headers waits for the client's delayed ACK (~40 ms on a kept-alive connection)
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror} (is another server using that port? "
                        "pick one with --port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(app, sock: socket.socket, quiet: bool = False) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=False,
                            timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
