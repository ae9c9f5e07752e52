"""Placement groups (Ray's "Placement Groups" guide): reserve bundles, schedule tasks and
actors into them, an infeasible group that does not become ready, removal."""

import ray
from ray.util.placement_group import (
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init(num_cpus=4)

pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK", name="compat-pg")
ready_pg = ray.get(pg.ready(), timeout=30)
assert ready_pg.id == pg.id
assert pg.wait(timeout_seconds=10)
assert pg.bundle_count == 2
assert pg.bundle_specs == [{"CPU": 1}, {"CPU": 1}]
table = placement_group_table(pg)
assert table["state"] == "CREATED", table
assert table["strategy"] == "PACK" and table["name"] == "compat-pg"
assert ray.util.get_placement_group("compat-pg").id == pg.id
# Two of the four CPUs are held by the group.
assert ray.available_resources().get("CPU", 0) <= 2


@ray.remote(num_cpus=1)
def where_am_i():
    current = get_current_placement_group()
    return None if current is None else current.id.hex()


@ray.remote(num_cpus=1)
class Member:
    def group(self):
        return ray.get_runtime_context().get_placement_group_id()

    def ping(self):
        return "pong"


strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)
assert ray.get(where_am_i.options(scheduling_strategy=strategy).remote()) == pg.id.hex()
assert ray.get(where_am_i.remote()) is None

member = Member.options(
    scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=1
    )
).remote()
assert ray.get(member.group.remote()) == pg.id.hex()

# STRICT_SPREAD needs one node per bundle: on one node it never becomes ready.
spread = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
assert spread.wait(timeout_seconds=2) is False
ready, not_ready = ray.wait([spread.ready()], timeout=1)
assert ready == [] and len(not_ready) == 1
assert placement_group_table(spread)["state"] != "CREATED"
remove_placement_group(spread)

# Removing a group kills its actors.
remove_placement_group(pg)
try:
    ray.get(member.ping.remote(), timeout=30)
except ray.exceptions.RayActorError:
    pass
else:
    raise AssertionError("an actor of a removed placement group still answered")

ray.shutdown()
print("COMPAT OK")
