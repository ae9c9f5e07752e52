"""Turning values into frames and back.

A serialized value is a list of frames: the pickle stream, then one frame per out-of-band buffer
(pickle protocol 5), so numpy arrays and other buffer-exporting values are never copied into the
pickle stream and can be sent as separate ZeroMQ frames.
"""

from __future__ import annotations

import contextlib
import pickle
import types
from collections.abc import Sequence
from typing import Any

import cloudpickle

from nbcluster.exceptions import ObjectLostError, SerializationError
from nbcluster.store.client import StoreClient, is_stored
from nbcluster.store.segment import PLAIN_TYPES


def dumps(value: Any, copy: bool = True) -> list[Any]:
    """Serialize ``value`` into ``[pickle_bytes, *buffers]``.

    Buffers are copied: the value is captured at call time (as in Ray), so changing an array after
    ``put(a)`` or ``f.remote(a)`` does not change what the cluster sees. Values deserialized from
    these frames (numpy arrays, ...) are read-only views of them. With ``copy=False`` the buffers
    are views of ``value``'s memory: copy them (:func:`copy_frames`) or into the store at once.
    """
    if type(value) in PLAIN_TYPES:
        return [pickle.dumps(value, protocol=5)]
    buffers: list[pickle.PickleBuffer] = []
    data = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    if not copy:
        return [data, *(b.raw() for b in buffers)]
    return [data, *(b.raw().tobytes() for b in buffers)]


def copy_frames(frames: Sequence[Any]) -> list[Any]:
    """Frames that own their bytes (the buffers of ``dumps(..., copy=False)`` copied)."""
    return [frames[0], *(memoryview(f).tobytes() for f in frames[1:])]


def loads(frames: Sequence[Any], store: StoreClient | None = None) -> Any:
    """Inverse of :func:`dumps`; buffers are used in place (zero-copy where possible).

    ``frames`` may instead reference an object in the node's shared-memory store, which
    ``store`` then maps (numpy arrays come back as read-only views of shared memory).
    """
    if not frames:
        raise SerializationError("no frames to deserialize")
    if is_stored(frames):
        if store is None:
            raise ObjectLostError(
                "this value lives in a node's object store, and this process has no store to "
                "read it from (is a node agent running on this host?)"
            )
        return store.get(frames)
    bufs = [f.buffer if hasattr(f, "buffer") else f for f in frames[1:]]
    first = frames[0]
    data = first.buffer if hasattr(first, "buffer") else first
    return pickle.loads(data, buffers=bufs)


class DepMarker:
    """Stands in for a top-level ``ObjectRef`` argument until its value is known."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return (DepMarker, (self.index,))


def dumps_args(
    fn_name: str, args: tuple[Any, ...], kwargs: dict[str, Any], is_ref: Any, copy: bool = True
) -> tuple[list[Any], list[Any]]:
    """Serialize call arguments, lifting out top-level refs.

    Returns ``(frames, deps)``: ``deps`` are the top-level ``ObjectRef`` arguments (positional or
    keyword) replaced in the pickle by :class:`DepMarker` s, to be resolved before the call.

    Raises
    ------
    SerializationError
        Naming the argument that cannot be pickled.
    """
    deps: list[Any] = []

    def lift(v: Any) -> Any:
        if is_ref(v):
            deps.append(v)
            return DepMarker(len(deps) - 1)
        return v

    a = tuple(lift(v) for v in args)
    k = {key: lift(v) for key, v in kwargs.items()}
    if all(type(v) in PLAIN_TYPES for v in a) and all(type(v) in PLAIN_TYPES for v in k.values()):
        return [pickle.dumps((a, k), protocol=5)], deps  # (no refs among them either)
    try:
        return dumps((a, k), copy), deps
    except Exception as exc:
        culprit = _find_unpicklable(a, k)
        raise SerializationError(
            f"could not serialize {culprit} of {fn_name}(): {type(exc).__name__}: {exc}"
        ) from exc


def _find_unpicklable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    for i, v in enumerate(args):
        try:
            dumps(v)
        except Exception:
            return f"argument {i} ({_short_repr(v)})"
    for key, v in kwargs.items():
        try:
            dumps(v)
        except Exception:
            return f"keyword argument {key!r} ({_short_repr(v)})"
    return "the arguments"


def _short_repr(v: Any) -> str:
    try:
        r = repr(v)
    except Exception:
        r = f"<{type(v).__name__}>"
    return r if len(r) <= 80 else r[:77] + "..."


def loads_args(
    frames: Sequence[Any], dep_values: Sequence[Any], store: StoreClient | None = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Deserialize call arguments and put resolved dependency values in place of markers.

    Large arguments arrive as one stored object (``store`` maps it).
    """
    a, k = loads(frames, store)
    if dep_values:

        def put(v: Any) -> Any:
            return dep_values[v.index] if isinstance(v, DepMarker) else v

        a = tuple(put(v) for v in a)
        k = {key: put(v) for key, v in k.items()}
    return a, k


def restore_filenames(fn: Any, filename: str) -> Any:
    """Give code pickled by value (cloudpickle says ``<dynamic-code>``) its file name back.

    Tracebacks then name the real file and line, as they would in the driver.
    """

    def fix(code: types.CodeType) -> types.CodeType:
        consts = tuple(fix(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        if code.co_filename == "<dynamic-code>":
            return code.replace(co_filename=filename, co_consts=consts)
        return code.replace(co_consts=consts)

    if not filename:
        return fn
    targets = [fn]
    if isinstance(fn, type):  # an actor class: fix its methods
        targets = [getattr(v, "__func__", v) for v in vars(fn).values()]
    for f in targets:
        code = getattr(f, "__code__", None)
        if isinstance(code, types.CodeType):
            with contextlib.suppress(Exception):
                f.__code__ = fix(code)
    return fn
