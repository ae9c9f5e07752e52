"""Named actors, namespaces and the runtime context (Ray's "Named Actors" and
"ray.runtime_context")."""

import ray

ray.init(num_cpus=4, namespace="compat")


@ray.remote
class Registry:
    def __init__(self):
        self.items = {}

    def put(self, key, value):
        self.items[key] = value

    def get(self, key):
        return self.items.get(key)

    def whoami(self):
        ctx = ray.get_runtime_context()
        return ctx.get_actor_name(), ctx.get_actor_id(), ctx.namespace, ctx.get_job_id()


@ray.remote
def task_context():
    ctx = ray.get_runtime_context()
    return ctx.get_job_id(), ctx.get_node_id(), ctx.get_task_id(), ctx.get_actor_id()


@ray.remote
def use_registry(key):
    registry = ray.get_actor("registry")
    return ray.get(registry.get.remote(key))


registry = Registry.options(name="registry").remote()
ray.get(registry.put.remote("answer", 42))
same = ray.get_actor("registry")
assert ray.get(same.get.remote("answer")) == 42
assert ray.get(use_registry.remote("answer")) == 42

# get_if_exists returns the existing actor instead of failing on the name.
again = Registry.options(name="registry", get_if_exists=True).remote()
assert ray.get(again.get.remote("answer")) == 42

# Names live in a namespace.
other = Registry.options(name="registry", namespace="elsewhere").remote()
assert ray.get(other.get.remote("answer")) is None
assert ray.get(ray.get_actor("registry", namespace="elsewhere").get.remote("answer")) is None
try:
    ray.get_actor("no-such-actor")
except ValueError:
    pass
else:
    raise AssertionError("get_actor of an unknown name did not raise ValueError")

ctx = ray.get_runtime_context()
assert ctx.namespace == "compat"
job_id, node_id = ctx.get_job_id(), ctx.get_node_id()
assert isinstance(job_id, str) and isinstance(node_id, str)
t_job, t_node, t_task, t_actor = ray.get(task_context.remote())
assert (t_job, t_node) == (job_id, node_id)
assert isinstance(t_task, str) and t_actor is None
name, actor_id, namespace, a_job = ray.get(registry.whoami.remote())
assert name == "registry" and namespace == "compat" and a_job == job_id
assert isinstance(actor_id, str)

nodes = ray.nodes()
assert len(nodes) == 1 and nodes[0]["Alive"] and nodes[0]["NodeID"] == node_id
assert ray.cluster_resources()["CPU"] == 4

ray.kill(registry)
ray.shutdown()
print("COMPAT OK")
