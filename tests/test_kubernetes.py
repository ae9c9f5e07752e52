"""KubernetesCluster's manifests, validated offline against the Kubernetes schemas.

No Kubernetes cluster is reachable here: the pool's manifests are checked with
``kubernetes-validate`` (the OpenAPI schemas of each Kubernetes release, strict: unknown fields
are errors) and for what they must hold (the secret only in the Secret, GPUs as
``nvidia.com/gpu``, the labels the pool finds its pods by). Applying them through kr8s is not
exercised (docs/scaling-out.md says so).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

import nbcluster as nb
from nbcluster.client import current
from nbcluster.deploy.kubernetes import (
    TOKEN_PATH,
    KubernetesCluster,
    head_manifests,
    pod_status,
    pool_labels,
    quantity,
    worker_deployment_manifest,
)
from nbcluster.deploy.pool import JobState
from nbcluster.deploy.registry import Pools, option_parser, parse_words
from nbcluster.exceptions import ConfigurationError

kv = pytest.importorskip("kubernetes_validate")

#: The oldest Kubernetes release still commonly run, one in the middle, and the newest known.
VERSIONS = ["1.28", "1.31", kv.latest_version()]


def validate(manifest: dict[str, Any]) -> None:
    for version in VERSIONS:
        kv.validate(manifest, version, strict=True)


@pytest.fixture(scope="module")
def driver() -> Iterator[None]:
    nb.shutdown()
    nb.init(num_cpus=1)
    yield
    nb.shutdown()


@pytest.fixture
def pool(driver: None) -> Iterator[KubernetesCluster]:
    p = KubernetesCluster(
        "ghcr.io/example/nbcluster:0.1.0",
        namespace="ml",
        cpus=8,
        memory="32GB",
        gpus=1,
        env={"NCCL_DEBUG": "INFO"},
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        image_pull_policy="IfNotPresent",
    )
    yield p
    p.close()


def test_pool_manifests_are_valid_and_keep_the_secret_in_the_secret(
    pool: KubernetesCluster,
) -> None:
    token = current.require()._token
    secret, *pods = pool.manifests(2)
    assert [m["kind"] for m in (secret, *pods)] == ["Secret", "Pod", "Pod"]
    for m in (secret, *pods, pool.secret_manifest(reveal=True)):
        validate(m)
    # The secret's value is shown only when asked for, and is nowhere in the pods.
    assert token not in json.dumps(secret)
    assert pool.secret_manifest(reveal=True)["stringData"] == {"token": token}
    assert all(token not in json.dumps(p) for p in pods)

    pod = pods[0]
    name = pod["metadata"]["name"]
    assert name == f"{pool.pool_id}-0" and pods[1]["metadata"]["name"] == f"{pool.pool_id}-1"
    assert pod["metadata"]["namespace"] == "ml"
    assert pod["metadata"]["labels"] == pool_labels(pool.pool_id, "worker")
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    (c,) = spec["containers"]
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "32G"},
        "limits": {"cpu": "8", "memory": "32G", "nvidia.com/gpu": 1},
    }
    # The agent reads the mounted Secret as a plain file (subPath: no symbolic link).
    cmd = c["command"]
    assert cmd[:3] == ["python3", "-m", "nbcluster.agent"]
    assert cmd[cmd.index("--token-file") + 1] == TOKEN_PATH
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == TOKEN_PATH)
    assert mount["subPath"] == "token" and mount["readOnly"]
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["secret"] == {"secretName": pool.secret_name, "defaultMode": 0o400}
    # How the pool finds the pod's node once it joins, and what ends the agent.
    assert f"nbcluster.job={name}" in cmd and f"nbcluster.pool={pool.pool_id}" in cmd
    assert cmd[cmd.index("--bind-host") + 1] == "auto"
    assert "--head-timeout" in cmd and "--exit-with-job" in cmd
    assert cmd[cmd.index("--num-gpus") + 1] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in c["env"]
    assert pool.node_resources() == {"CPU": 8.0, "GPU": 1.0}


def test_deployment_and_head_manifests_are_valid(pool: KubernetesCluster) -> None:
    pod = pool.pod_manifest(f"{pool.pool_id}-0")
    labels = pool_labels(pool.pool_id, "worker")
    dep = worker_deployment_manifest("nbcluster-workers", 3, pod, labels=labels)
    validate(dep)
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["template"]["spec"]["restartPolicy"] == "Always"
    assert dep["spec"]["selector"]["matchLabels"] == labels
    deployment, service = head_manifests(
        "nbcluster-head",
        namespace="ml",
        image=pool.image,
        secret_name=pool.secret_name,
        labels=pool_labels(pool.pool_id, "head"),
        cpus=2,
        memory="4Gi",
    )
    validate(deployment)
    validate(service)
    head_cmd = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert head_cmd[head_cmd.index("--token-file") + 1] == TOKEN_PATH
    assert service["spec"]["ports"][0]["port"] == 7711
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_validator_catches_a_broken_manifest(pool: KubernetesCluster) -> None:
    """The offline check is not a formality: a wrong field or type fails it."""
    pod = pool.pod_manifest(f"{pool.pool_id}-0")
    pod["spec"]["containers"][0]["resurces"] = pod["spec"]["containers"][0].pop("resources")
    with pytest.raises(kv.ValidationError, match="resurces"):
        validate(pod)
    pod = pool.pod_manifest(f"{pool.pool_id}-0")
    pod["spec"]["restartPolicy"] = 0
    with pytest.raises(kv.ValidationError):
        validate(pod)


def test_bad_input_is_refused_with_the_reason(driver: None) -> None:
    assert quantity("32GiB", "memory") == "32Gi" and quantity(0.5, "cpus") == "0.5"
    assert quantity("500m", "cpus") == "500m"
    with pytest.raises(ValueError, match="memory: '32 gigs' is not a Kubernetes quantity"):
        KubernetesCluster("img", memory="32 gigs")
    with pytest.raises(ValueError, match="gpus must be a whole number"):
        KubernetesCluster("img", gpus=1.5)  # type: ignore[arg-type]  # the wrong type on purpose
    with pytest.raises(ValueError, match="namespace 'My_NS' is not a valid Kubernetes name"):
        KubernetesCluster("img", namespace="My_NS")
    # The local head listens on loopback: pods could never reach it.
    pool = KubernetesCluster("img")
    try:
        with pytest.raises(ConfigurationError, match="loopback"):
            pool.scale(1)
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("status", "state", "reason", "failed"),
    [
        (
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ],
            },
            JobState.PENDING,
            "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            False,
        ),
        (
            {
                "phase": "Pending",
                "containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}],
            },
            JobState.PENDING,
            "ContainerCreating",
            False,
        ),
        (
            {
                "phase": "Pending",
                "containerStatuses": [
                    {
                        "state": {
                            "waiting": {
                                "reason": "ImagePullBackOff",
                                "message": 'Back-off pulling image "nope"',
                            }
                        }
                    }
                ],
            },
            JobState.GONE,
            'ImagePullBackOff: Back-off pulling image "nope"',
            True,
        ),
        ({"phase": "Running"}, JobState.RUNNING, "", False),
        (
            {
                "phase": "Failed",
                "containerStatuses": [
                    {"state": {"terminated": {"reason": "Error", "exitCode": 3}}}
                ],
            },
            JobState.GONE,
            "Error, exit code 3",
            True,
        ),
        (
            {
                "phase": "Succeeded",
                "containerStatuses": [
                    {"state": {"terminated": {"reason": "Completed", "exitCode": 0}}}
                ],
            },
            JobState.GONE,
            "Completed, exit code 0",
            False,
        ),
    ],
)
def test_pod_status_as_job_state(
    status: dict[str, Any], state: JobState, reason: str, failed: bool
) -> None:
    got = pod_status({"spec": {"nodeName": "gpu-7"}, "status": status})
    assert (got.state, got.reason, got.failed, got.host) == (state, reason, failed, "gpu-7")


def test_the_magics_options_make_a_kubernetes_pool(driver: None) -> None:
    """``%nbcluster scale kubernetes N --image IMG --gpus 1 ...`` builds this pool."""
    _, opts = parse_words(
        ["--image", "img:1", "--namespace", "ml", "--cpus", "4", "--gpus", "1", "--memory", "8Gi"],
        option_parser("%nbcluster scale"),
    )
    pools = Pools()
    pool = pools.get("kubernetes", opts)
    try:
        assert isinstance(pool, KubernetesCluster)
        _, pod = pool.manifests(1)
        validate(pod)
        assert pod["spec"]["containers"][0]["resources"]["limits"] == {
            "cpu": "4",
            "memory": "8Gi",
            "nvidia.com/gpu": 1,
        }
    finally:
        pools.close_all()
