"""Framing: a msgpack header frame followed by raw payload frames.

A header is built as a dict or as its kind's typed message (a ``msgspec.Struct`` of
:mod:`nbcluster.protocol.schema`, encoded faster; its fields at their defaults are left out,
which receivers read as those defaults).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import msgspec

from nbcluster.exceptions import ProtocolError

Frame = bytes | memoryview | bytearray
Header = dict[str, Any]

_packer = msgpack.Packer(use_bin_type=True)
_encoder = msgspec.msgpack.Encoder()


def encode(header: Header | msgspec.Struct, payload: Sequence[Any] = ()) -> list[Any]:
    """Return the frames of one message: the packed header, then the payload frames."""
    if isinstance(header, msgspec.Struct):
        return [_encoder.encode(header), *payload]
    return [_packer.pack(header), *payload]


def decode(frames: Sequence[Any]) -> tuple[Header, list[Any]]:
    """Split received frames into ``(header, payload)``.

    Raises
    ------
    ProtocolError
        If the first frame is not a msgpack map with a ``"k"`` kind.
    """
    if not frames:
        raise ProtocolError("empty message")
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else first
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed header frame: {exc}") from None
    if not isinstance(header, dict) or "k" not in header:
        raise ProtocolError("header is not a map with a kind")
    return header, list(frames[1:])
