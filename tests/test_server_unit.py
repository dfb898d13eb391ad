"""Server pieces without a daemon: per-connection reply backpressure."""

from __future__ import annotations

import contextlib
import socket

import trio
import trio.testing

from jobd.connections import Connection, Peer
from jobd.errors import ProtocolError
from jobd.protocol import ErrorCode, Role


async def test_a_client_that_does_not_read_stops_the_reading_of_its_requests() -> None:
    # lockstep streams: send_all returns only when the peer has received the bytes,
    # like a full socket buffer of a client that does not read.
    server_end, client_end = trio.testing.lockstep_stream_pair()
    conn = Connection(server_end, Peer(1, 1000, 1000), Role.READ, 60.0)
    may_read = False

    async def reader() -> None:
        nonlocal may_read
        await conn.room_to_read(1000)
        may_read = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.reply, b"x" * 2000)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.unsent == 2000
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert not may_read  # 2,000 bytes of replies wait: no more requests are read
        received = b""
        while len(received) < 2000:
            received += await client_end.receive_some(4096)
        await trio.testing.wait_all_tasks_blocked()
        assert may_read and conn.unsent == 0


async def test_a_reply_queued_behind_a_fatal_error_never_races_the_shutdown() -> None:
    # A reply waiting for the send lock while the connection is being closed after
    # a fatal error (too_large, invalid_json) must not write during send_eof: trio
    # raises BusyResourceError for two senders, which took the whole daemon down.
    a, b = socket.socketpair()
    a.setblocking(False)
    # Fill the socket so that the error's send blocks until the client reads.
    with contextlib.suppress(BlockingIOError):
        while True:
            a.send(b"x" * 65536)
    server_end = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    client_end = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    conn = Connection(server_end, Peer(1, 1000, 1000), Role.READ, 60.0)
    error = ProtocolError(ErrorCode.INVALID_JSON, "not valid JSON")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.fatal, error)
        await trio.testing.wait_all_tasks_blocked()  # fatal is sending its error
        nursery.start_soon(conn.reply, b'{"id":1,"result":{}}\n')  # queued behind it
        await trio.testing.wait_all_tasks_blocked()
        received = b""
        while chunk := await client_end.receive_some(65536):
            received += chunk
        await client_end.aclose()  # ends fatal's linger
    await server_end.aclose()
    assert b'{"id":null,"error":{"code":"invalid_json"' in received
