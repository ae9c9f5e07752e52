"""``nbcluster memory``: what the nodes' object stores hold, asked of the agents by the head."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

import nbcluster as nb
from nbcluster.util.state import list_objects
from tests.conftest import ROOT, wait_until
from tests.multinode import Procs

MiB = 2**20
#: A second driver: puts an object, prints its id, and holds it until its stdin closes.
OTHER_DRIVER = """
import sys, numpy as np, nbcluster as nb
nb.init(address=sys.argv[1], token_file=sys.argv[2])
ref = nb.put(np.full(3 * 2**20, 7, dtype=np.uint8))
print("REF", ref.hex(), flush=True)
sys.stdin.read()
"""


def run_memory(
    procs: Procs, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``nbcluster memory ARGS`` (with ``--address`` and ``--token-file`` unless ``env`` is
    given, which replaces the address and secret variables of this environment)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("NBCLUSTER_")}
    full.update({**(env or {}), "PYTHONPATH": str(ROOT)})
    if env is None:
        args = ("--address", procs.address, "--token-file", str(procs.token_file), *args)
    return subprocess.run(
        [sys.executable, "-m", "nbcluster", "memory", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=full,
    )


def memory_cli(procs: Procs, *args: str, env: dict[str, str] | None = None) -> str:
    out = run_memory(procs, *args, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_memory_lists_two_drivers_objects_with_spilled_state(procs: Procs) -> None:
    procs.start_head()
    # A store of 5 MiB: the second 3 MiB object pushes the first (unpinned) one to disk.
    node_id = procs.join("small", "--num-cpus", "1", "--object-store-memory", str(5 * MiB))
    nb.init(address=procs.address, token_file=str(procs.token_file))
    mine = nb.put(np.zeros(3 * MiB, dtype=np.uint8))
    out_file = procs.tmp / "other-driver.out"
    with open(out_file, "w") as out:
        other = subprocess.Popen(
            [sys.executable, "-c", OTHER_DRIVER, procs.address, str(procs.token_file)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:

        def ref_line() -> str | None:
            lines = [x for x in out_file.read_text().splitlines() if x.startswith("REF ")]
            assert other.poll() is None, out_file.read_text()
            return lines[0] if lines else None

        other_hex = str(wait_until(ref_line, 60)).split()[1]

        body = json.loads(memory_cli(procs, "--json"))
        (node,) = body["nodes"]
        assert node["node_id"] == node_id and node["name"] == "small" and node["error"] is None
        assert node["objects"] == 2 and node["spilled"] >= 3 * MiB
        by_id = {o["object_id"]: o for o in body["objects"]}
        assert set(by_id) == {mine.hex(), other_hex}
        a, b = by_id[mine.hex()], by_id[other_hex]
        assert a["state"] == "spilled" and b["state"] == "in_memory"
        for o in (a, b):
            assert 3 * MiB <= o["size"] < 4 * MiB
            assert o["node_id"] == node_id and o["node_name"] == "small"
        assert a["owner"]["job_id"] and b["owner"]["job_id"]
        assert a["owner"]["job_id"] != b["owner"]["job_id"]  # two drivers, two jobs

        # The table, with the address from the environment; --limit keeps the largest.
        env = {"NBCLUSTER_ADDRESS": procs.address, "NBCLUSTER_TOKEN_FILE": str(procs.token_file)}
        text = memory_cli(procs, env=env)
        assert mine.hex() in text and other_hex in text and "spilled" in text
        assert "3.0 MiB" in text and "small" in text
        one = json.loads(memory_cli(procs, "--json", "--limit", "1"))
        assert len(one["objects"]) == 1 and one["limit"] == 1
        assert one["nodes"][0]["objects"] == 2 and one["nodes"][0]["listed"] == 1

        # ray.util.state.list_objects: the whole cluster's stored objects.
        rows = {r["object_id"]: r for r in list_objects(detail=True)}
        assert {mine.hex(), other_hex} <= set(rows)
        assert rows[mine.hex()]["owned"] is True and rows[other_hex]["owned"] is False
        assert rows[mine.hex()]["store_state"] == "spilled"
        assert rows[other_hex]["node_id"] == node_id and rows[other_hex]["object_size"] >= 3 * MiB
        spilled = list_objects(filters=[("store_state", "=", "spilled")])
        assert [r["object_id"] for r in spilled] == [mine.hex()]
    finally:
        if other.stdin is not None:
            other.stdin.close()
        other.wait(30)

    # The other driver is gone: its job's objects are freed.
    def freed() -> list[Any] | None:
        objs = json.loads(memory_cli(procs, "--json"))["objects"]
        return objs if [o["object_id"] for o in objs] == [mine.hex()] else None

    wait_until(freed, 20)


def test_memory_bad_limit_no_address_and_a_silent_node(procs: Procs) -> None:
    procs.start_head()
    procs.join("n", "--num-cpus", "1")
    procs.join("m", "--num-cpus", "1")
    out = run_memory(procs, "--limit", "0")
    assert out.returncode == 1 and "limit must be between 1 and" in out.stderr
    out = run_memory(procs, env={})  # no --address, no NBCLUSTER_ADDRESS
    assert out.returncode == 2 and "NBCLUSTER_ADDRESS" in out.stderr

    # A frozen agent does not answer: it is listed with the reason, the other node answers.
    procs.kill_agent("m", signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        body = json.loads(memory_cli(procs, "--json"))
        assert time.monotonic() - t0 < 30
        errors = {n["name"]: n["error"] for n in body["nodes"]}
        assert errors == {"n": None, "m": "no answer within 5 s"}
    finally:
        procs.kill_agent("m", signal.SIGCONT)
    # Its late answer is dropped; the next listing has both nodes again.
    body = json.loads(memory_cli(procs, "--json"))
    assert {n["name"]: n["error"] for n in body["nodes"]} == {"n": None, "m": None}


@pytest.mark.parametrize("limit", [None, 1])
def test_memory_without_objects(procs: Procs, limit: int | None) -> None:
    from nbcluster.status import memory_text, memory_view

    procs.start_head()
    procs.join("empty", "--num-cpus", "1")
    nb.init(address=procs.address, token_file=str(procs.token_file))
    body = memory_view(limit)
    assert body.objects == [] and [n.name for n in body.nodes] == ["empty"]
    assert body.nodes[0].objects == 0 and body.limit == (limit or 100)
    assert "0 largest object(s)" in memory_text(body)
