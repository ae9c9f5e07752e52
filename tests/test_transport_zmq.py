"""The ZeroMQ listener (``transport/channel.py``): a plain ROUTER socket whose descriptor the
loop watches itself, every waiting message taken in per wake-up.

Real CURVE sockets over loopback. What could go wrong in such a reader: messages lost or
reordered when many arrive at once, and a wake-up lost to the descriptor's edge triggering when
the listener sends while it waits (a send may take in what arrived meanwhile without the
descriptor firing again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
import zmq

from nbcluster.protocol.security import derive_keys
from nbcluster.transport.channel import READ_BATCH, PeerUnreachable, ZmqNetwork
from nbcluster.transport.sockets import Transport

TOKEN = "zmq-listener-test-token-0123456789"


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60.0))


def test_a_burst_from_many_peers_arrives_whole_and_in_order_per_peer() -> None:
    """More messages than one wake-up takes in (``READ_BATCH``), from several peers at once,
    answered as they come: every one arrives once, each peer's in order, every answer back."""
    n, peers = 3 * READ_BATCH + 7, 4

    async def scenario() -> None:
        net = ZmqNetwork(Transport(derive_keys(TOKEN)))
        try:
            listener = net.listen("tcp://127.0.0.1:0")
            chans = [await net.connect(listener.endpoint, verify_timeout=10) for _ in range(peers)]
            for p, ch in enumerate(chans):
                for i in range(n):
                    await ch.send([b"%d" % p, b"%d" % i])
            seen: dict[bytes, list[int]] = {}
            for _ in range(n * peers):
                ident, frames = await asyncio.wait_for(listener.recv(), 10)
                seen.setdefault(frames[0], []).append(int(frames[1]))
                listener.send_nowait(ident, [b"ok", frames[1]])
            assert sorted(seen) == [b"%d" % p for p in range(peers)]
            for got in seen.values():
                assert got == list(range(n))
            for ch in chans:
                answers = [await asyncio.wait_for(ch.recv(), 10) for _ in range(n)]
                assert [int(a[1]) for a in answers] == list(range(n))
        finally:
            net.close()

    run(scenario())


def test_messages_that_arrive_around_its_own_sends_are_not_missed() -> None:
    """Ping-pong where the listener's answer and the peer's next message cross: each round the
    listener sends while its ``recv`` waits, or just before waiting. A wake-up lost to the
    edge-triggered descriptor would leave a message unread and this test stuck (bounded)."""
    rounds = 2000

    async def scenario() -> None:
        net = ZmqNetwork(Transport(derive_keys(TOKEN)))
        try:
            listener = net.listen("tcp://127.0.0.1:0")
            ch = await net.connect(listener.endpoint, verify_timeout=10)
            await ch.send([b"hello"])
            ident, _ = await asyncio.wait_for(listener.recv(), 10)

            async def pusher() -> None:  # the listener sends on its own, unprompted
                for i in range(rounds):
                    await listener.send(ident, [b"push", b"%d" % i])
                    await asyncio.sleep(0)

            push = asyncio.create_task(pusher())
            got = 0
            for i in range(rounds):
                await ch.send([b"req", b"%d" % i])
                _, frames = await asyncio.wait_for(listener.recv(), 10)
                assert frames == [b"req", b"%d" % i]
                got += 1
            await asyncio.wait_for(push, 10)
            assert got == rounds
            pushed = [await asyncio.wait_for(ch.recv(), 10) for _ in range(rounds)]
            assert [int(f[1]) for f in pushed] == list(range(rounds))
        finally:
            net.close()

    run(scenario())


def test_sending_to_a_peer_that_is_not_there() -> None:
    """``send`` raises PeerUnreachable (ROUTER_MANDATORY); ``send_nowait`` logs and drops; the
    listener serves on."""

    async def scenario() -> None:
        net = ZmqNetwork(Transport(derive_keys(TOKEN)))
        try:
            listener = net.listen("tcp://127.0.0.1:0")
            with pytest.raises(PeerUnreachable):
                await listener.send(b"\0nobody", [b"x"])
            listener.send_nowait(b"\0nobody", [b"x"])
            ch = await net.connect(listener.endpoint, verify_timeout=10)
            await ch.send([b"still", b"here"])
            ident, frames = await asyncio.wait_for(listener.recv(), 10)
            assert frames == [b"still", b"here"]
            await listener.send(ident, [b"back"])
            assert await asyncio.wait_for(ch.recv(), 10) == [b"back"]
        finally:
            net.close()

    run(scenario())


def test_a_closed_listener_says_so_instead_of_waiting_forever() -> None:
    async def scenario() -> None:
        net = ZmqNetwork(Transport(derive_keys(TOKEN)))
        try:
            listener = net.listen("tcp://127.0.0.1:0")
            waiting = asyncio.create_task(listener.recv())
            await asyncio.sleep(0)  # (let it start waiting)
            listener.close()
            with pytest.raises(ConnectionError, match="closed"):
                await asyncio.wait_for(waiting, 10)
            assert listener.sock.closed and listener.sock.type == zmq.ROUTER
        finally:
            net.close()

    run(scenario())
