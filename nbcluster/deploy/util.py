"""Helpers shared by the pools: durations, loopback heads, shell lines, nodes for a demand."""

from __future__ import annotations

import ipaddress
import math
import shlex
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def parse_duration(value: float | str | None) -> float | None:
    """Seconds from ``300``, ``"300s"``, ``"5min"``, ``"2h"``, ``"1:30:00"`` (``None`` stays)."""
    if value is None or isinstance(value, int | float):
        if value is not None and value < 0:
            raise ValueError(f"a duration must not be negative, got {value!r}")
        return None if value is None else float(value)
    text = str(value).strip().lower()
    if ":" in text:
        parts = [float(p) for p in text.split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        return secs
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
    num = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = text[len(num) :].strip() or "s"
    if unit not in units or not num:
        raise ValueError(f"cannot read {value!r} as a duration (e.g. 300, '5min', '2h', '1:30:00')")
    return float(num) * units[unit]


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT``'s host is a loopback address (or ``localhost``)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


#: The hint a loopback head gets when a pool's jobs may run elsewhere.
LOOPBACK_HINT = (
    "the head listens on {address} (loopback), which jobs on other machines cannot reach. "
    "Start the head on an address they can reach: in JupyterLab set c.NbclusterApp.ip = "
    "'0.0.0.0' (or this host's address); from a script nbcluster.init(...) on a head started "
    "with `nbcluster head --host 0.0.0.0`; or run the jobs on this machine only"
)


def nodes_needed(pending: Iterable[Mapping[str, Any]], offer: Mapping[str, float]) -> int:
    """How many nodes offering ``offer`` the head's unmet demand asks for.

    ``pending`` is the head's ``demand`` query: ``[{"shape": {...}, "count": n}]``. A shape
    counts when one node could hold it, and a GPU shape only for a pool with GPUs, a CPU-only
    shape only for a pool without (a GPU node is not started for CPU work). The estimate is by
    resource totals, rounded up.
    """
    has_gpu = offer.get("GPU", 0) > 0
    total: dict[str, float] = {}
    for p in pending:
        shape = {k: float(v) for k, v in (p.get("shape") or {}).items() if float(v) > 0}
        wants_gpu = shape.get("GPU", 0) > 0
        if wants_gpu != has_gpu:
            continue
        if any(k in offer and v > offer[k] for k, v in shape.items()):
            continue  # bigger than one of our nodes: growing does not help
        if any(k not in offer and k not in ("memory",) for k in shape):
            continue  # a custom resource our nodes do not have
        n = int(p.get("count", 1))
        for k, v in shape.items():
            if k in offer:
                total[k] = total.get(k, 0.0) + v * n
    need = 0
    for k, v in total.items():
        if offer.get(k, 0) > 0:
            need = max(need, math.ceil(v / offer[k] - 1e-9))
    return need


def shell_command(argv: Sequence[str]) -> str:
    """``argv`` as one shell line; arguments holding ``$NAME`` stay expandable (double quotes)."""
    out = []
    for a in argv:
        if "$" in a and not any(c in a for c in '"`\\'):
            out.append(f'"{a}"')
        else:
            out.append(shlex.quote(a))
    return " ".join(out)
