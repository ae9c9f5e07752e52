"""Placement groups on a real cluster (a head and two node agents), with Ray's API and names.

Node ``a`` has 2 CPUs and 2 (logical) GPUs, node ``b`` 2 CPUs. Each test removes the groups it
made, so the next one starts from a free cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbcluster as nb
from nbcluster.client import current
from nbcluster.exceptions import ActorDiedError, NbclusterError, TaskUnschedulableError
from nbcluster.head.recovery import load_snapshot
from nbcluster.util import (
    get_current_placement_group,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from nbcluster.util.placement_group import PlacementGroup
from nbcluster.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from nbcluster.util.state import list_placement_groups
from tests.conftest import run_script, wait_until
from tests.multinode import Procs

TIMEOUT = 60.0  # seconds: the machine is shared and small

pytestmark = pytest.mark.timeout(300)
_PROCS: list[Procs] = []  # the module's cluster, for the head restart test


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Node name -> node id, with this process's driver connected."""
    nb.shutdown()
    procs = Procs(tmp_path_factory.mktemp("pg"))
    try:
        procs.start_head()
        a = procs.join("a", "--num-cpus", "2", "--num-gpus", "2", "--prestart", "1")
        b = procs.join("b", "--num-cpus", "2", "--prestart", "1")
        nb.init(address=procs.address, token_file=str(procs.token_file))
        os.environ["PG_TEST_ADDRESS"] = procs.address
        os.environ["PG_TEST_TOKEN"] = str(procs.token_file)
        _PROCS.append(procs)
        yield {"a": a, "b": b}
    except BaseException:
        print(procs.logs())
        raise
    finally:
        procs.close()


@pytest.fixture(autouse=True)
def free_cluster(nodes: dict[str, str]) -> Iterator[None]:
    """Every test starts and must end with all 4 CPUs free (its groups removed)."""
    yield
    for row in placement_group_table().values():
        if row["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(row["placement_group_id"]))
    wait_until(lambda: nb.available_resources().get("CPU") == 4.0, TIMEOUT)


@nb.remote(num_cpus=1)
def where(hold_s: float = 0.0) -> str:
    time.sleep(hold_s)
    return nb.get_runtime_context().get_node_id()


def _in(pg: PlacementGroup, index: int = -1) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def test_strict_spread_puts_one_bundle_on_each_node(nodes: dict[str, str]) -> None:
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    assert nb.get(pg.ready(), timeout=TIMEOUT) == pg
    row = placement_group_table(pg)
    assert row["state"] == "CREATED" and row["strategy"] == "STRICT_SPREAD"
    assert row["bundles"] == {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}
    assert sorted(row["bundles_to_node_id"].values()) == sorted(nodes.values())
    # A task in bundle i runs on bundle i's node.
    ran = nb.get(
        [where.options(scheduling_strategy=_in(pg, i)).remote() for i in (0, 1)], timeout=TIMEOUT
    )
    assert ran == [row["bundles_to_node_id"][0], row["bundles_to_node_id"][1]]
    # Ray's legacy options say the same.
    legacy = where.options(placement_group=pg, placement_group_bundle_index=1).remote()
    assert nb.get(legacy, timeout=TIMEOUT) == row["bundles_to_node_id"][1]
    with pytest.raises(ValueError, match="cannot both be given"):
        where.options(placement_group=pg, scheduling_strategy="SPREAD")
    # The reserved CPUs are not available to anyone else.
    assert nb.available_resources().get("CPU") == 2.0

    # The head's cluster view (the REST API's and the panel's) lists it with its bundles.
    def view() -> dict[str, Any]:
        groups = current.require().query("cluster")["placement_groups"]
        (found,) = [g for g in groups if g["placement_group_id"] == pg.id]
        return dict(found)

    assert view()["state"] == "CREATED" and not view()["infeasible"]
    assert [b["node_id"] for b in view()["bundles"]] == ran
    # The tasks' leases go back to their bundles once idle.
    full = [{"CPU": 1.0}, {"CPU": 1.0}]
    wait_until(lambda: [b["available"] for b in view()["bundles"]] == full, TIMEOUT)
    remove_placement_group(pg)
    assert placement_group_table(pg)["state"] == "REMOVED"


def test_strict_pack_puts_every_bundle_on_one_node_with_its_gpus(nodes: dict[str, str]) -> None:
    pg = placement_group([{"CPU": 1}, {"GPU": 1}], strategy="STRICT_PACK")
    assert pg.wait(TIMEOUT) is True
    row = placement_group_table(pg)
    assert set(row["bundles_to_node_id"].values()) == {nodes["a"]}  # the only node with GPUs

    @nb.remote(num_cpus=0, num_gpus=1)
    def gpu_task() -> tuple[str, list[int]]:
        return nb.get_runtime_context().get_node_id(), nb.get_gpu_ids()

    node, gpus = nb.get(gpu_task.options(scheduling_strategy=_in(pg, 1)).remote(), timeout=TIMEOUT)
    assert node == nodes["a"] and len(gpus) == 1
    # The bundle's GPU is its own: a plain GPU task gets the other one.
    node2, other = nb.get(gpu_task.remote(), timeout=TIMEOUT)
    assert node2 == nodes["a"] and other != gpus and len(other) == 1
    # A task asking for more than its bundle holds fails at once.
    with pytest.raises(TaskUnschedulableError, match="more than bundle 0"):
        nb.get(where.options(num_cpus=2, scheduling_strategy=_in(pg, 0)).remote(), timeout=TIMEOUT)


def test_infeasible_group_is_reported_and_waits(
    nodes: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    pg = placement_group([{"CPU": 3}], strategy="STRICT_PACK", name="too-big")
    assert pg.wait(1) is False
    wait_until(lambda: "cannot be placed" in caplog.text, TIMEOUT)
    assert "too-big" in caplog.text
    row = placement_group_table(pg)
    assert row["state"] == "PENDING" and row["stats"]["scheduling_state"] == "INFEASIBLE"
    ready = pg.ready()
    remove_placement_group(pg)
    # What waited for it fails, naming the removal.
    with pytest.raises(TaskUnschedulableError, match="removed"):
        nb.get(ready, timeout=TIMEOUT)


@nb.remote(num_cpus=1)
def current_group() -> str | None:
    pg = get_current_placement_group()
    assert nb.get_runtime_context().get_placement_group_id() == (pg.id if pg else None)
    return pg.id.hex() if pg is not None else None


def test_tasks_and_actors_know_their_group(nodes: dict[str, str]) -> None:
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    assert pg.wait(TIMEOUT)
    assert get_current_placement_group() is None  # the driver
    assert nb.get_runtime_context().get_placement_group_id() is None
    assert nb.get(current_group.remote(), timeout=TIMEOUT) is None  # a task outside
    inside = current_group.options(scheduling_strategy=_in(pg, 1)).remote()
    assert nb.get(inside, timeout=TIMEOUT) == pg.id.hex()
    member = Member.options(scheduling_strategy=_in(pg)).remote()  # type: ignore[attr-defined]
    assert nb.get(member.group.remote(), timeout=TIMEOUT) == pg.id.hex()


@nb.remote(num_cpus=1)
class Member:
    def group(self) -> str | None:
        found = get_current_placement_group()
        return found.id.hex() if found is not None else None

    def child_group(self) -> str | None:
        return nb.get(current_group.remote(), timeout=TIMEOUT)  # type: ignore[no-any-return]


@nb.remote(num_cpus=1)
def parent() -> dict[str, Any]:
    """What the tasks and actors this task creates see as their group."""
    # One at a time: the group has 3 bundles of 1 CPU, and this task holds one.
    out: dict[str, Any] = {
        "own": nb.get(current_group.remote(), timeout=TIMEOUT),
        "default": nb.get(
            current_group.options(scheduling_strategy="DEFAULT").remote(), timeout=TIMEOUT
        ),
        "grandchild": nb.get(hop.remote(), timeout=TIMEOUT),
    }
    member = Member.remote()  # type: ignore[attr-defined]
    out["actor"] = nb.get(member.group.remote(), timeout=TIMEOUT)
    out["actor_child"] = nb.get(member.child_group.remote(), timeout=TIMEOUT)
    nb.kill(member)
    out["capture"] = nb.get_runtime_context().should_capture_child_tasks_in_placement_group
    return out


@nb.remote(num_cpus=1)
def hop() -> str | None:
    return nb.get(current_group.remote(), timeout=TIMEOUT)  # type: ignore[no-any-return]


def test_capture_child_tasks_runs_children_in_the_parents_group(nodes: dict[str, str]) -> None:
    """With ``placement_group_capture_child_tasks=True`` what a task creates without a strategy
    of its own runs in its group (any bundle), and so on down; without it, outside."""
    pg = placement_group([{"CPU": 1}] * 3, strategy="PACK")
    assert pg.wait(TIMEOUT)
    assert nb.get_runtime_context().should_capture_child_tasks_in_placement_group  # (Ray's)
    captured = PlacementGroupSchedulingStrategy(pg, 0, placement_group_capture_child_tasks=True)
    seen = nb.get(parent.options(scheduling_strategy=captured).remote(), timeout=TIMEOUT)
    assert seen == {
        "own": pg.id.hex(),
        "default": None,  # a strategy of its own ("DEFAULT" included) is not captured
        "grandchild": pg.id.hex(),  # captured children capture theirs
        "actor": pg.id.hex(),
        "actor_child": pg.id.hex(),  # an actor created so captures its children too
        "capture": True,
    }
    plain = nb.get(parent.options(scheduling_strategy=_in(pg, 0)).remote(), timeout=TIMEOUT)
    assert plain == {
        "own": None,
        "default": None,
        "grandchild": None,
        "actor": None,
        "actor_child": None,
        "capture": False,
    }


def test_gang_reservation_never_half_reserves(nodes: dict[str, str]) -> None:
    first = placement_group([{"CPU": 2}], strategy="STRICT_PACK")
    assert first.wait(TIMEOUT)
    # Three 1-CPU bundles need 3 CPUs; 2 are free: nothing is reserved for it meanwhile.
    second = placement_group([{"CPU": 1}] * 3, strategy="PACK")
    started = time.monotonic()
    assert second.wait(1) is False
    assert time.monotonic() - started >= 0.9  # it waited out its time
    ready = second.ready()
    assert nb.wait([ready], timeout=0.5) == ([], [ready])
    assert nb.available_resources().get("CPU") == 2.0
    # ... so a plain task needing both free CPUs still runs.
    assert nb.get(where.options(num_cpus=2).remote(), timeout=TIMEOUT) in nodes.values()
    remove_placement_group(first)  # now it fits: placed whole
    assert nb.get(ready, timeout=TIMEOUT) == second
    assert second.wait(TIMEOUT) is True
    assert len(placement_group_table(second)["bundles_to_node_id"]) == 3


def test_reserved_cpus_are_only_for_the_group(nodes: dict[str, str]) -> None:
    pg = placement_group([{"CPU": 2}, {"CPU": 2}], strategy="STRICT_SPREAD")
    assert pg.wait(TIMEOUT)
    plain = where.remote()
    ready, _ = nb.wait([plain], timeout=2)
    assert ready == []  # every CPU is reserved: a task outside the group waits
    inside = where.options(scheduling_strategy=_in(pg)).remote()
    assert nb.get(inside, timeout=TIMEOUT) in nodes.values()
    remove_placement_group(pg)
    assert nb.get(plain, timeout=TIMEOUT) in nodes.values()  # freed by the removal


@nb.remote(num_cpus=1)
class Pinger:
    def ping(self) -> str:
        return nb.get_runtime_context().get_node_id()


def test_removal_kills_actors_and_tasks_and_frees_resources(nodes: dict[str, str]) -> None:
    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK", name="doomed")
    assert pg.wait(TIMEOUT)
    assert get_placement_group("doomed") == pg
    (listed,) = list_placement_groups(filters=[("name", "=", "doomed")], detail=True)
    assert listed.placement_group_id == pg.id and listed.state == "CREATED"
    assert [b["bundle_id"] for b in listed.bundles] == [0, 1] and listed.is_detached is False
    node = placement_group_table(pg)["bundles_to_node_id"][0]
    actor = Pinger.options(scheduling_strategy=_in(pg, 0)).remote()  # type: ignore[attr-defined]
    assert nb.get(actor.ping.remote(), timeout=TIMEOUT) == node
    long = where.options(scheduling_strategy=_in(pg, 1), max_retries=0).remote(600)
    wait_until(lambda: nb.available_resources().get("CPU") == 2.0, TIMEOUT)
    remove_placement_group(pg)

    def actor_died() -> bool:  # the kill reaches the actor a moment after the removal
        try:
            nb.get(actor.ping.remote(), timeout=TIMEOUT)
        except ActorDiedError as exc:
            return "placement group" in str(exc)
        return False

    wait_until(actor_died, TIMEOUT)
    with pytest.raises(NbclusterError):  # its worker was killed
        nb.get(long, timeout=TIMEOUT)
    wait_until(lambda: nb.available_resources().get("CPU") == 4.0, TIMEOUT)
    with pytest.raises(ValueError, match="doomed"):
        get_placement_group("doomed")
    remove_placement_group(pg)  # twice is fine


def test_groups_end_with_their_job_unless_detached(nodes: dict[str, str]) -> None:
    script = """
import os, nbcluster as nb
from nbcluster.util import placement_group
nb.init(address=os.environ["PG_TEST_ADDRESS"], token_file=os.environ["PG_TEST_TOKEN"])
mine = placement_group([{"CPU": 1}], name="of-the-job")
kept = placement_group([{"CPU": 1}], name="kept", lifetime="detached")
assert mine.wait(60) and kept.wait(60)
print("IDS", mine.id.hex(), kept.id.hex())
"""
    out = run_script(script, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    mine, kept = out.stdout.split("IDS ")[1].split()

    def states() -> tuple[str, str]:
        table = placement_group_table()
        return table[mine]["state"], table[kept]["state"]

    wait_until(lambda: states() == ("REMOVED", "CREATED"), TIMEOUT)
    assert nb.available_resources().get("CPU") == 3.0
    remove_placement_group(PlacementGroup(kept))


@nb.remote(num_cpus=0)
class Maker:
    def make(self) -> str:
        pg = placement_group([{"CPU": 1}])
        assert pg.wait(60)
        return pg.id.hex()


def test_groups_die_with_the_actor_that_created_them(nodes: dict[str, str]) -> None:
    maker = Maker.remote()  # type: ignore[attr-defined]
    pg_id = nb.get(maker.make.remote(), timeout=TIMEOUT)
    assert placement_group_table()[pg_id]["state"] == "CREATED"
    nb.kill(maker)
    wait_until(lambda: placement_group_table()[pg_id]["state"] == "REMOVED", TIMEOUT)


def test_bad_arguments_raise_ray_errors(nodes: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="strategy"):
        placement_group([{"CPU": 1}], strategy="PACKED")
    with pytest.raises(ValueError, match="non-empty"):
        placement_group([])
    with pytest.raises(ValueError, match="lifetime"):
        placement_group([{"CPU": 1}], lifetime="forever")
    with pytest.raises(ValueError, match="no resources"):
        placement_group([{"CPU": 0}])
    pg = placement_group([{"CPU": 1}], name="unique")
    with pytest.raises(ValueError, match="already exists"):
        placement_group([{"CPU": 1}], name="unique")
    with pytest.raises(ValueError, match="out of range"):
        PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=1)
    remove_placement_group(pg)


def test_bundles_of_a_dead_node_are_placed_again(nodes: dict[str, str]) -> None:
    (procs,) = _PROCS
    c = procs.join("c", "--num-cpus", "1")
    pg = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    assert pg.wait(TIMEOUT)
    assert sorted(placement_group_table(pg)["bundles_to_node_id"].values()) == sorted(
        [*nodes.values(), c]
    )
    procs.kill_agent("c")  # SIGKILL: the head notices its silence
    wait_until(lambda: placement_group_table(pg)["state"] == "RESCHEDULING", TIMEOUT)
    assert len(placement_group_table(pg)["bundles_to_node_id"]) == 2  # no third node now
    d = procs.join("d", "--num-cpus", "1")
    assert pg.wait(TIMEOUT)
    row = placement_group_table(pg)
    assert row["state"] == "CREATED" and d in row["bundles_to_node_id"].values()
    remove_placement_group(pg)
    procs.kill_agent("d", signal.SIGTERM)  # drained: the cluster is back to its two nodes
    assert procs.agents["d"].wait(TIMEOUT) == 0


@nb.remote(num_cpus=1)
def marked(marker: str, hold_s: float) -> str:
    Path(marker).touch()
    time.sleep(hold_s)
    return nb.get_runtime_context().get_node_id()


@nb.remote(num_cpus=1, num_gpus=1)
def held(marker: str, release: str) -> tuple[float, float]:
    """Runs from when it marks ``marker`` until ``release`` exists (60 s at most)."""
    start = time.time()
    Path(marker).touch()
    deadline = time.monotonic() + 60
    while not Path(release).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return start, time.time()


def test_head_restart_keeps_groups_and_their_reservations(
    nodes: dict[str, str], tmp_path: Path
) -> None:
    """Groups are in the restart snapshot: after a head restart they are found by name, listed,
    usable and removable, and their bundles (GPU ids included) hold their resources, with what
    ran in them before the restart counted inside the bundle, not on top of it."""
    (procs,) = _PROCS
    pg = placement_group([{"CPU": 1, "GPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD", name="kept")
    assert pg.wait(TIMEOUT)
    before = placement_group_table(pg)
    assert before["bundles_to_node_id"] == {0: nodes["a"], 1: nodes["b"]}
    marker, release = tmp_path / "started", tmp_path / "release"
    first = held.options(scheduling_strategy=_in(pg, 0), max_retries=0).remote(
        str(marker), str(release)
    )
    wait_until(marker.exists, TIMEOUT)

    def saved() -> bool:
        snap = load_snapshot(str(procs.state_file))
        return snap is not None and [g["pg_id"] for g in snap.groups] == [str(pg.id)]

    wait_until(saved, TIMEOUT)
    procs.kill_head()
    procs.start_head()

    assert get_placement_group("kept") == pg
    after = placement_group_table(pg)
    for key in ("name", "strategy", "state", "bundles", "bundles_to_node_id"):
        assert after[key] == before[key], key
    # New work in the group runs (lease requests wait until the restart is settled: the nodes
    # and this driver are back, with the lease of the task still running in bundle 0).
    got = nb.get(where.options(scheduling_strategy=_in(pg, 1)).remote(), timeout=TIMEOUT)
    assert got == nodes["b"]
    # The group holds 2 CPUs and a GPU whatever runs in it: that task counts inside bundle 0
    # (not on top of it: 1 CPU free; not forgotten: 3 CPUs and 2 GPUs free).
    assert not release.exists()
    free = nb.available_resources()
    assert (free.get("CPU"), free.get("GPU")) == (2.0, 1.0)
    # Bundle 0 is busy until the first task ends: a second one waits for it (no double booking).
    second = held.options(scheduling_strategy=_in(pg, 0)).remote(
        str(tmp_path / "second"), str(release)
    )
    time.sleep(1.0)  # (time for a wrongly placed task to start: there is no event to wait on)
    assert not (tmp_path / "second").exists()
    release.touch()
    (_, first_end), (second_start, _) = nb.get([first, second], timeout=TIMEOUT)
    assert second_start >= first_end
    remove_placement_group(pg)
    wait_until(lambda: placement_group_table(pg)["state"] == "REMOVED", TIMEOUT)
