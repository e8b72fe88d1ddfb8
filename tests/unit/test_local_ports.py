"""`aimesh up` picks ports a server can bind, not only ports nobody listens on."""

from __future__ import annotations

import socket

from aimesh_cli.local import port_free


def test_a_port_held_by_a_client_connection_is_not_free() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        listening = server.getsockname()[1]
        assert not port_free(listening)
        with socket.create_connection(("127.0.0.1", listening)) as client:
            # The client's local end: nothing listens there, yet a server
            # binding it fails with "Address already in use".
            local_end = client.getsockname()[1]
            assert not port_free(local_end)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        unused = probe.getsockname()[1]
    assert port_free(unused)
