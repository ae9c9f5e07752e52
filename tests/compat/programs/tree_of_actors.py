"""Ray's "Pattern: using a supervisor actor to manage a tree of actors", and its fate
sharing: actors an actor created die with it."""

import time

import ray

ray.init(num_cpus=4)


@ray.remote(num_cpus=0.5)
class Trainer:
    def __init__(self, hyperparameter, data):
        self.hyperparameter = hyperparameter
        self.data = data

    def fit(self):
        return sum(x * self.hyperparameter for x in self.data)

    def ping(self):
        return "pong"


@ray.remote(num_cpus=0.5)
class Supervisor:
    def __init__(self, hyperparameters, data):
        self.trainers = [Trainer.remote(h, data) for h in hyperparameters]

    def fit(self):
        return ray.get([trainer.fit.remote() for trainer in self.trainers])

    def trainers_handles(self):
        return self.trainers


data = [1, 2, 3]
supervisor = Supervisor.remote([1, 2, 3], data)
assert ray.get(supervisor.fit.remote()) == [6, 12, 18]

# Handles of the children travel to the driver and can be called from there.
trainers = ray.get(supervisor.trainers_handles.remote())
assert ray.get([t.ping.remote() for t in trainers]) == ["pong"] * 3

# Killing the supervisor kills the actors it owns.
ray.kill(supervisor)
deadline = time.monotonic() + 15
alive = list(trainers)
while alive and time.monotonic() < deadline:
    still = []
    for t in alive:
        try:
            ray.get(t.ping.remote(), timeout=5)
            still.append(t)
        except ray.exceptions.RayActorError:
            pass
    alive = still
    if alive:
        time.sleep(0.2)
assert not alive, "children outlived their supervisor"

ray.shutdown()
print("COMPAT OK")
