"""Server pieces without a daemon: per-connection reply backpressure."""

from __future__ import annotations

import trio
import trio.testing

from jobd.protocol import Role
from jobd.server import Connection, Peer


async def test_a_client_that_does_not_read_stops_the_reading_of_its_requests() -> None:
    # lockstep streams: send_all returns only when the peer has received the bytes,
    # like a full socket buffer of a client that does not read.
    server_end, client_end = trio.testing.lockstep_stream_pair()
    conn = Connection(server_end, Peer(1, 1000, 1000), Role.READ)
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
