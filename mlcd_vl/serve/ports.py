"""Whether a server can bind its address, asked before a model is loaded, with the answer in the CLI's words."""

from __future__ import annotations

import socket

from mlcd_vl.errors import UserError


def check_port_free(host: str, port: int) -> None:
    """Bind `host:port` once and let go; raise a one-line `UserError` naming `--port` when that fails."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UserError(f"--host {host}: cannot resolve it ({error.strerror})") from None
    with socket.socket(family, kind, protocol) as probe:
        # as the servers themselves bind: a port left in TIME_WAIT by an earlier run is free, a listening one is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise UserError(f"--port {port}: {host}:{port} is not available ({error.strerror}); another server is "
                            "probably using it: stop it or choose another --port") from None
