"""The head and the node agent on the in-memory transport, in one process.

The real :class:`HeadService` and :class:`NodeAgent` run on a :class:`MemoryNetwork`; peers that
are not real here (a driver, an agent that starts no processes) are played by the test, speaking
the protocol through in-memory channels. Nothing is mocked: these are the code paths the
ZeroMQ transport drives, minus the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from nbcluster.agent.agent import NodeAgent, wants_pong
from nbcluster.exceptions import ProtocolError
from nbcluster.head import service as service_module
from nbcluster.head.service import HeadService
from nbcluster.protocol import schema as m
from nbcluster.protocol.codec import Header, encode
from nbcluster.protocol.messages import DEAD, PROTOCOL_VERSION, Kind
from nbcluster.protocol.validation import MalformedMessage, receive_message
from nbcluster.transport.channel import Channel, MemoryNetwork
from nbcluster.transport.serve import Dispatcher, answer_on, follow, serve

TOKEN = "memory-transport-test-token"
WAIT_S = 10.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60.0))


async def recv(ch: Channel) -> m.Message:
    msg, _ = receive_message(await asyncio.wait_for(ch.recv(), WAIT_S))
    return msg


async def send(ch: Channel, header: Header) -> None:
    await ch.send(encode(header))


@contextlib.asynccontextmanager
async def head_on(net: MemoryNetwork) -> AsyncIterator[HeadService]:
    head = HeadService(TOKEN, network=net)
    await head.start()
    try:
        yield head
    finally:
        await head.stop(stop_nodes=False)


async def fake_agent(net: MemoryNetwork, head: HeadService) -> tuple[Channel, str]:
    """A node that registers with 2 CPUs and starts no workers by itself."""
    ch = await net.connect(f"tcp://{head.address}")
    await send(
        ch,
        {
            "k": Kind.REGISTER_NODE,
            "v": PROTOCOL_VERSION,
            "name": "memnode",
            "address": "127.0.0.1",
            "resources": {"CPU": 2},
            "pid": os.getpid(),
        },
    )
    reply = await recv(ch)
    assert isinstance(reply, m.NodeRegistered), reply
    return ch, reply.node_id


async def driver(net: MemoryNetwork, head: HeadService) -> tuple[Channel, str]:
    ch = await net.connect(f"tcp://{head.address}")
    await send(ch, {"k": Kind.HELLO, "v": PROTOCOL_VERSION, "pid": 0, "role": "driver"})
    welcome = await recv(ch)
    assert isinstance(welcome, m.Welcome), welcome
    return ch, welcome.job_id


def test_a_node_registers_and_a_driver_gets_a_lease() -> None:
    async def scenario() -> None:
        net = MemoryNetwork()
        async with head_on(net) as head:
            agent, node_id = await fake_agent(net, head)
            assert head.state.nodes[node_id].name == "memnode"
            drv, job_id = await driver(net, head)

            await send(drv, {"k": Kind.LEASE_REQUEST, "rid": 7, "shape": {"CPU": 1}, "name": "f"})
            start = await recv(agent)  # no idle worker yet: the head asks the node for one
            assert isinstance(start, m.StartWorker), start
            ready = {"worker_id": "w1", "addr": "tcp://w1", "control_addr": "tcp://w1c", "pid": 1}
            await send(agent, {"k": Kind.WORKER_READY, **ready})
            grant = await recv(drv)
            assert isinstance(grant, m.LeaseGranted), grant
            assert (grant.rid, grant.worker_id, grant.node_id) == (7, "w1", node_id)
            assert grant.shape == {"CPU": 1} and type(grant.shape["CPU"]) is int  # as sent
            lease = head.state.leases[grant.lease_id]
            assert lease.job_id == job_id and head.state.workers["w1"].lease_id == lease.lease_id

            await send(drv, {"k": Kind.LEASE_RETURN, "lease_id": grant.lease_id})
            await send(drv, {"k": Kind.PING})
            assert isinstance(await recv(drv), m.Pong)  # in order: the return was handled
            assert grant.lease_id not in head.state.leases
            head.state.validate_state()

    run(scenario())


def test_the_head_answers_an_agent_s_ping_only_when_asked_or_its_interval_changed() -> None:
    """An agent that heard from the head lately pings with ``want: false``: no PONG (at 1,000
    agents the PONGs were a third of what pings cost the head). One that wants an answer, or
    whose interval changed, gets one. Each ping is followed by a query, whose reply must come
    next: a PONG where none was due would come first."""

    async def scenario() -> None:
        net = MemoryNetwork()
        async with head_on(net) as head:
            agent, node_id = await fake_agent(net, head)
            peer = head.peers[head.state.nodes[node_id].client]

            async def ping(rid: int, want: bool) -> list[m.Message]:
                await send(agent, {"k": Kind.PING, "store": {"capacity": 1}, "want": want})
                await send(agent, {"k": Kind.QUERY, "rid": rid, "what": "head"})
                got = [await recv(agent)]
                while not isinstance(got[-1], m.QueryReply):
                    got.append(await recv(agent))
                assert got[-1].rid == rid
                return got[:-1]

            assert await ping(1, want=False) == []
            [pong] = await ping(2, want=True)
            assert isinstance(pong, m.Pong) and pong.every == 1.0
            peer.ping_s = (4.0, 4.0)  # as told while the cluster was large: now it shrank
            [pong] = await ping(3, want=False)
            assert isinstance(pong, m.Pong) and pong.every == 1.0
            assert peer.ping_s == (1.0, 4.0)  # the old interval still bounds its silence once
            assert await ping(4, want=False) == []

    run(scenario())


def test_an_agent_asks_for_an_answer_once_a_quarter_of_its_head_timeout_passed() -> None:
    assert not wants_pong(29.0, 120.0) and wants_pong(30.0, 120.0)
    assert wants_pong(1.0, 2.0)  # a short timeout: (nearly) every ping asks
    assert not wants_pong(1e6, 0.0)  # no timeout: nothing to prove


def test_a_lookup_of_an_actor_not_created_yet_waits_for_it_then_says_dead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A handle can reach another process (and its lookup the head) before the creator's
    ``ACTOR_CREATE``: the head answers once it knows, or after ``RESOLVE_WAIT_S`` that there is
    no such actor. Each lookup is followed by a query whose reply must come first."""
    monkeypatch.setattr(service_module, "RESOLVE_WAIT_S", 0.3)

    async def scenario() -> None:
        net = MemoryNetwork()
        async with head_on(net) as head:
            drv, _ = await driver(net, head)
            await send(drv, {"k": Kind.ACTOR_RESOLVE, "aid": "nosuchactor1"})
            await send(drv, {"k": Kind.QUERY, "rid": 1, "what": "head"})
            first = await recv(drv)
            assert isinstance(first, m.QueryReply), first  # not a DEAD at once
            assert "nosuchactor1" in head.actors.unresolved
            dead = await recv(drv)  # then, the wait over
            assert isinstance(dead, m.ActorState), dead
            assert (dead.aid, dead.state) == ("nosuchactor1", DEAD) and "no such actor" in (
                dead.reason or ""
            )
            assert head.actors.unresolved == {}

    run(scenario())


def test_malformed_messages_are_answered_and_the_head_serves_on() -> None:
    async def scenario() -> None:
        net = MemoryNetwork()
        async with head_on(net) as head:
            drv, _ = await driver(net, head)

            await drv.send([b"\xc1 not msgpack"])  # no kind at all: answered
            err = await recv(drv)
            assert isinstance(err, m.Error) and err.code == "protocol", err
            # A request missing a field: answered, naming its rid.
            await send(drv, {"k": Kind.LEASE_REQUEST, "rid": 9, "name": "f"})
            err = await recv(drv)
            assert isinstance(err, m.Error) and (err.code, err.rid) == ("protocol", 9), err
            assert "shape" in err.msg
            # A malformed kind nobody waits on is dropped; the next message is served.
            await send(drv, {"k": Kind.LEASE_RETURN, "lease_id": 5})
            await send(drv, {"k": Kind.QUERY, "rid": 10, "what": "head"})
            reply = await recv(drv)
            assert isinstance(reply, m.QueryReply) and reply.rid == 10, reply
            assert reply.result["address"] == head.address

            stranger = await net.connect(f"tcp://{head.address}")  # never said hello
            await send(stranger, {"k": Kind.PING})
            err = await recv(stranger)
            assert isinstance(err, m.Error) and err.code == "nohello", err

    run(scenario())


def test_a_failing_handler_is_answered_internal_and_the_loop_serves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        net = MemoryNetwork()
        listener = net.listen("tcp://127.0.0.1:0")
        seen: list[str] = []

        async def on_query(peer: bytes, msg: m.Query, payload: list[Any]) -> None:
            if msg.what == "boom":
                raise RuntimeError("a bug")
            seen.append(msg.what)
            await listener.send(peer, encode({"k": Kind.QUERY_REPLY, "rid": msg.rid, "result": 1}))

        d = Dispatcher[bytes]({m.Query: on_query}, what="in the test", answer=answer_on(listener))
        server = asyncio.create_task(serve(listener, d))
        try:
            ch = await net.connect(listener.endpoint)
            await send(ch, {"k": Kind.QUERY, "rid": 1, "what": "boom"})
            err = await recv(ch)
            assert isinstance(err, m.Error) and (err.code, err.rid) == ("internal", 1), err
            assert "RuntimeError: a bug" in err.msg
            await send(ch, {"k": Kind.PONG})  # no handler: logged and dropped
            await send(ch, {"k": Kind.QUERY, "rid": 2, "what": "fine"})
            reply = await recv(ch)
            assert isinstance(reply, m.QueryReply) and reply.rid == 2
            assert seen == ["fine"]
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server

    with caplog.at_level(logging.WARNING):
        run(scenario())
    assert "ignoring a message of an unexpected kind in the test: pong" in caplog.text


def test_a_real_agent_registers_reports_and_stops_in_memory(tmp_path: Any) -> None:
    async def scenario() -> None:
        net = MemoryNetwork()
        head = HeadService(TOKEN, network=net)
        await head.start()
        agent = NodeAgent(
            head.address,
            TOKEN,
            name="memagent",
            num_cpus=2,
            prestart=0,
            object_store_memory=16 << 20,
            spill_dir=str(tmp_path / "spill"),
            network=net,
        )
        try:
            await agent.start()
            node = head.state.nodes[agent.node_id]
            assert node.name == "memagent" and node.info["store_id"] == agent.store_id
            # Its heartbeat carries the store's figures (once a second).
            del node.info["object_store"]  # sent with the registration: wait for a fresh one
            for _ in range(int(WAIT_S / 0.1)):
                if "capacity" in (node.info.get("object_store") or {}):
                    break
                await asyncio.sleep(0.1)
            assert node.info["object_store"]["capacity"] == 16 << 20

            # Its store answers requests, and malformed ones with an ERROR naming the request.
            store = await net.connect(agent.store_address)
            await send(store, {"k": Kind.STORE_RESERVE, "rid": 3, "oid": "o1"})  # no size
            err = await recv(store)
            assert isinstance(err, m.Error) and (err.code, err.rid) == ("protocol", 3), err
            await send(store, {"k": Kind.STORE_STATS, "rid": 4})
            stats = await recv(store)
            assert isinstance(stats, m.StoreReply) and stats.ok and stats.rid == 4, stats
            assert stats.stats is not None and stats.stats["capacity"] == 16 << 20

            # Garbage from the head is dropped; the agent serves on and obeys STOP_NODE.
            head_side = net.listeners[f"tcp://{head.address}"]
            await head_side.send(node.client, [b"\xc1"])
            await head_side.send(node.client, encode({"k": Kind.KILL_WORKER}))  # no worker_id
            await head.stop(stop_nodes=True)
            await asyncio.wait_for(agent.stopped.wait(), WAIT_S)
        finally:
            await head.stop(stop_nodes=False)
            await agent.close()

    run(scenario())


def test_a_connection_s_dispatcher_with_sync_handlers_and_a_malformed_hook() -> None:
    """How a client reads the head: sync handlers, no answers, a malformed reply with a ``rid``
    handed to a hook (which fails the request waiting for it)."""

    async def scenario() -> None:
        net = MemoryNetwork()
        listener = net.listen("tcp://127.0.0.1:0")
        ch = await net.connect(listener.endpoint)
        got: list[str] = []
        failed: list[int | None] = []
        done = asyncio.Event()

        def on_pong(peer: str, msg: m.Pong, payload: list[Any]) -> None:
            got.append(peer)
            done.set()

        def on_malformed(peer: str, exc: ProtocolError) -> bool:
            failed.append(exc.rid if isinstance(exc, MalformedMessage) else None)
            return True

        d = Dispatcher[str]({m.Pong: on_pong}, what="from the head", on_malformed=on_malformed)
        reader = asyncio.create_task(follow(ch, d, "head"))
        try:
            peer = next(iter(listener.peers))
            await listener.send(peer, encode({"k": Kind.QUERY_REPLY, "rid": 5}))  # no result
            await listener.send(peer, encode({"k": Kind.PONG}))
            await asyncio.wait_for(done.wait(), WAIT_S)
            assert failed == [5] and got == ["head"]
            assert listener.inbox.empty()  # nothing was answered
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    run(scenario())
