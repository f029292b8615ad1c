"""The servers' listening address, bound before a model is loaded, so a busy port fails at once in the CLI's words."""

from __future__ import annotations

import errno
import socket

from mlcd_vl.errors import UserError


def bind(host: str, port: int) -> socket.socket:
    """The socket bound to `host:port` (not yet listening); a one-line `UserError` naming `--port` when it is taken.

    `serve` hands the socket to uvicorn; `web` closes it at once (Gradio binds its own) and so learns the answer
    before the model loads, in our words rather than Gradio's (which name GRADIO_SERVER_PORT).
    """
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UserError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    sock = socket.socket(family, kind, protocol)
    # as uvicorn and Gradio: a port left in TIME_WAIT by an earlier run is free, a listening one is not
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        reason = "the port is in use" if error.errno == errno.EADDRINUSE else (error.strerror or str(error))
        raise UserError(f"cannot serve on {host}:{port}: {reason} (choose another --port)") from None
    return sock
