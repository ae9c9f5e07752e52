"""The message schemas: one per kind, what they accept and refuse, and the docs made from them."""

from __future__ import annotations

import logging

import msgpack
import pytest

from nbcluster.exceptions import ProtocolError
from nbcluster.protocol import doc
from nbcluster.protocol.codec import encode
from nbcluster.protocol.messages import Kind
from nbcluster.protocol.schema import SCHEMAS, Task
from nbcluster.protocol.validation import (
    INTERNAL,
    MALFORMED,
    MalformedMessage,
    RateLimitedLog,
    error_reply,
    expects_reply,
    receive,
    should_answer,
    validate,
)


def test_every_kind_has_exactly_one_schema() -> None:
    assert set(SCHEMAS) == {k.value for k in Kind}
    for kind, cls in SCHEMAS.items():
        assert cls.__struct_config__.tag == kind


def test_docs_list_every_kind_as_its_schema_says() -> None:
    assert doc.main(["--check"]) == 0, "run: python -m nbcluster.protocol.doc"
    text = doc.DOC.read_text()
    for kind in Kind:
        assert f"| `{kind.name}` (`{kind.value}`) | {doc.fields_text(SCHEMAS[kind.value])}" in text


def test_messages_as_the_code_sends_them_are_valid() -> None:
    task = {"k": Kind.TASK, "tid": "ab.1", "fn": "f0", "name": "f", "nargs": 1, "nret": 1}
    task.update(fnb=1, deps=[2], gpus=[0], assigned={"CPU": 1.0, "GPU_IDS": [0]})
    msg = validate(task, [b"fn", b"arg", b"dep", b"buf"])
    assert isinstance(msg, Task) and msg.frames() == 4 and msg.deps == [2]
    lease = {"k": Kind.LEASE_REQUEST, "rid": 3, "shape": {"CPU": 1}, "name": "f"}
    lease["strategy"] = {"t": "node", "node": "n1", "soft": False, "spill": False}
    validate(lease)  # an int amount is a float
    validate({"k": Kind.STORE_PULL, "rid": 1, "oid": "x.0", "from": "tcp://h:1", "job": None})
    validate({"k": Kind.RESULT, "tid": "t", "ok": True, "n": [2, 1]}, [b"a", b"b", b"c"])
    validate({"k": Kind.STOP_NODE, "extra": {"ignored": [1, 2]}})  # undeclared: ignored


@pytest.mark.parametrize(
    ("header", "payload", "why"),
    [
        ({"k": Kind.CANCEL}, [], "missing required field `tid`"),
        ({"k": Kind.STORE_UNPIN}, [], "missing required field `oid`"),
        ({"k": Kind.CANCEL, "tid": 7}, [], "Expected `str`, got `int` - at `$.tid`"),
        ({"k": Kind.LEASE_CANCEL, "rid": True}, [], "Expected `int`, got `bool`"),
        ({"k": Kind.STORE_RESERVE, "rid": 1, "oid": "o", "size": -1}, [], ">= 0"),
        ({"k": Kind.STORE_FREE, "oids": ["a", 3]}, [], "at `$.oids[1]`"),
        ({"k": Kind.LEASE_REQUEST, "rid": 1, "shape": {"CPU": "1"}}, [], "$.shape"),
        ({"k": Kind.LEASE_REQUEST, "rid": 1, "shape": {}, "strategy": {"t": 1}}, [], "$.strategy"),
        ({"k": Kind.STORE_CHUNK, "rid": 1, "off": 0, "size": 3}, [], "0 payload frames"),
        ({"k": Kind.TASK, "tid": "", "fn": "", "nargs": 2, "deps": [1]}, [b""], "declares 3"),
        ({"k": Kind.PING}, [b"stray"], "1 payload frames, its header declares 0"),
        ({"k": "nonsense"}, [], "unknown message kind 'nonsense'"),
        ({"k": ["a", "list"]}, [], "unknown message kind"),
    ],
)  # fmt: skip
def test_malformed_messages_are_refused(header: dict, payload: list, why: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(MalformedMessage) as info:
        validate(header, payload)
    assert why in str(info.value)


def test_undecodable_frames_are_protocol_errors() -> None:
    for frames in ([], [b"\xc1"], [msgpack.packb([1, 2])], [msgpack.packb({"no": "kind"})]):
        with pytest.raises(ProtocolError):
            receive(frames)
    header, payload = receive(encode({"k": Kind.ESCAPE, "oid": "o"}))
    assert header == {"k": "escape", "oid": "o"} and payload == []


def test_answers_name_the_request() -> None:
    with pytest.raises(MalformedMessage) as info:
        validate({"k": Kind.QUERY, "rid": 12})  # no "what"
    exc = info.value
    assert exc.kind == "query" and exc.rid == 12 and should_answer(exc)
    reply = error_reply(exc)
    assert reply == {"k": Kind.ERROR, "msg": str(exc), "code": MALFORMED, "rid": 12}
    validate(reply)
    with pytest.raises(MalformedMessage) as info:
        validate({"k": Kind.STORE_UNPIN, "rid": "x"})  # nobody waits for an unpin
    assert not should_answer(info.value) and info.value.rid is None
    assert should_answer(ProtocolError("malformed header frame"))  # no kind: it may be waiting
    internal = error_reply(KeyError("oid"), INTERNAL, 4)
    assert internal["code"] == INTERNAL and internal["rid"] == 4 and "KeyError" in internal["msg"]
    assert expects_reply({"k": "sreserve"}) and not expects_reply({"k": "sunpin"})


def test_rate_limited_log(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.getLogger("nbcluster.test"), "dropped", burst=3, interval=60)
    with caplog.at_level(logging.WARNING, "nbcluster.test"):
        for i in range(100):
            limited(f"message {i}")
    assert [r.getMessage() for r in caplog.records] == [f"dropped: message {i}" for i in range(3)]
    assert limited.total == 100 and limited.suppressed == 97
    limited._window -= 61  # the next interval: the count of what was left out comes first
    with caplog.at_level(logging.WARNING, "nbcluster.test"):
        limited("again")
    assert [r.getMessage() for r in caplog.records][-2:] == [
        "dropped: 97 more not logged",
        "dropped: again",
    ]
