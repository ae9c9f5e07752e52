"""Node agents as Kubernetes pods: the manifests, and a pool that applies them through kr8s.

Each job of a :class:`KubernetesCluster` is one pod running ``python -m nbcluster.agent``. The
cluster secret is a Kubernetes ``Secret`` mounted into the pod as a file (read with
``--token-file``), never in the pod's command line or environment. GPUs are asked for as
``nvidia.com/gpu`` limits, CPUs and memory as requests and limits. Every object carries the
labels ``app.kubernetes.io/name=nbcluster`` and ``nbcluster.io/pool=POOL_ID``, so ``kubectl get
pods -l nbcluster.io/pool=POOL_ID`` lists a pool's pods.

The manifest functions are pure (plain dicts, no client): :meth:`KubernetesCluster.manifests`
shows exactly what would be applied, and the tests validate them against the Kubernetes schemas
offline. Talking to a cluster needs the optional ``kr8s`` client (``pip install
'nbcluster[kubernetes]'``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

#: Labels every object of a pool carries.
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
POOL_LABEL_K8S = "nbcluster.io/pool"
#: Where the Secret's token is mounted in each pod.
TOKEN_PATH = "/etc/nbcluster/token"
#: Seconds a deleted pod has between SIGTERM (the agent drains) and SIGKILL.
GRACE_PERIOD_S = 30

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def quantity(value: float | int | str, what: str) -> str:
    """``value`` as a Kubernetes quantity: ``4``, ``"500m"``, ``"32Gi"``; ``"32GB"`` and
    ``"32GiB"`` (Slurm's and humans' spelling) become ``"32G"`` and ``"32Gi"``.

    Raises
    ------
    ValueError
        Not a quantity Kubernetes would accept (naming ``what``).
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number or a quantity like '32Gi', got {value!r}")
    text = f"{value:g}" if isinstance(value, int | float) else str(value).strip()
    if re.fullmatch(r".*[0-9](k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)B", text):
        text = text[:-1]  # 32GB -> 32G, 32GiB -> 32Gi
    if not _QUANTITY.match(text):
        raise ValueError(
            f"{what}: {value!r} is not a Kubernetes quantity (e.g. 4, '500m', '32Gi', '64G')"
        )
    return text


def dns_name(name: str, what: str = "name") -> str:
    """Check ``name`` is a valid object name (lowercase letters, digits, '-'; at most 63)."""
    if len(name) > 63 or not _DNS_NAME.match(name):
        raise ValueError(
            f"{what} {name!r} is not a valid Kubernetes name: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return name


def pool_labels(pool_id: str, component: str) -> dict[str, str]:
    """The labels of every object a pool makes."""
    return {NAME_LABEL: "nbcluster", COMPONENT_LABEL: component, POOL_LABEL_K8S: pool_id}


def secret_manifest(
    name: str, token: str, *, namespace: str, labels: Mapping[str, str]
) -> dict[str, Any]:
    """The ``Secret`` holding the cluster secret under the key ``token``."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": dns_name(name), "namespace": namespace, "labels": dict(labels)},
        "type": "Opaque",
        "stringData": {"token": token},
    }


def _resources(
    cpus: float | None, memory: str | None, gpus: int
) -> dict[str, dict[str, str | int]]:
    requests: dict[str, str | int] = {}
    limits: dict[str, str | int] = {}
    if cpus is not None:
        requests["cpu"] = limits["cpu"] = quantity(cpus, "cpus")
    if memory is not None:
        requests["memory"] = limits["memory"] = quantity(memory, "memory")
    if gpus:
        # An extended resource: asked for as a limit (the request defaults to it), whole GPUs.
        limits["nvidia.com/gpu"] = int(gpus)
    out: dict[str, dict[str, str | int]] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _token_volume(secret_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Secret as a volume, and its mount as one file at :data:`TOKEN_PATH`.

    ``subPath`` mounts the file itself: a whole-volume mount would give a symbolic link
    (``token -> ..data/token``), which ``--token-file`` refuses. Mode 0400, owned by root:
    the agent must run as root in the pod (most images do), else it refuses the file as not
    its own.
    """
    volume = {
        "name": "nbcluster-token",
        "secret": {"secretName": secret_name, "defaultMode": 0o400},
    }
    mount = {
        "name": "nbcluster-token",
        "mountPath": TOKEN_PATH,
        "subPath": "token",
        "readOnly": True,
    }
    return volume, mount


def worker_pod_manifest(
    name: str,
    *,
    namespace: str,
    image: str,
    command: Sequence[str],
    secret_name: str,
    labels: Mapping[str, str],
    cpus: float | None = None,
    memory: str | None = None,
    gpus: int = 0,
    env: Mapping[str, str] | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    service_account: str | None = None,
    image_pull_policy: str | None = None,
) -> dict[str, Any]:
    """One worker pod: the agent's ``command`` with the secret mounted at :data:`TOKEN_PATH`.

    ``restartPolicy: Never``: an agent that exits (its head gone, a failure) ends the pod and
    frees its resources; the pool shows it gone, with its log.
    """
    volume, mount = _token_volume(secret_name)
    container: dict[str, Any] = {
        "name": "agent",
        "image": image,
        "command": list(command),
        "env": [
            # The pod's own name and address, for the agent's node name and logs.
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *({"name": k, "value": str(v)} for k, v in (env or {}).items()),
        ],
        # The object store lives in /dev/shm: more than the container runtime's 64 MiB.
        "volumeMounts": [mount, {"name": "dshm", "mountPath": "/dev/shm"}],
        "resources": _resources(cpus, memory, gpus),
    }
    if image_pull_policy is not None:
        container["imagePullPolicy"] = image_pull_policy
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": GRACE_PERIOD_S,
        "containers": [container],
        "volumes": [volume, {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    if service_account:
        spec["serviceAccountName"] = service_account
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": dns_name(name), "namespace": namespace, "labels": dict(labels)},
        "spec": spec,
    }


def worker_deployment_manifest(
    name: str, replicas: int, pod: Mapping[str, Any], *, labels: Mapping[str, str]
) -> dict[str, Any]:
    """The same workers as a ``Deployment`` of ``replicas`` pods (for ``kubectl apply`` by hand:
    the pool itself makes pods, one per job). Its pods restart: ``restartPolicy: Always``."""
    template_spec = dict(pod["spec"])
    template_spec["restartPolicy"] = "Always"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": dns_name(name),
            "namespace": pod["metadata"]["namespace"],
            "labels": dict(labels),
        },
        "spec": {
            "replicas": int(replicas),
            "selector": {"matchLabels": dict(labels)},
            "template": {"metadata": {"labels": dict(labels)}, "spec": template_spec},
        },
    }


def head_manifests(
    name: str,
    *,
    namespace: str,
    image: str,
    secret_name: str,
    labels: Mapping[str, str],
    port: int = 7711,
    python: str = "python3",
    cpus: float | None = None,
    memory: str | None = None,
) -> list[dict[str, Any]]:
    """A head in the cluster: a one-replica ``Deployment`` and a ``Service`` (``NAME:PORT``)
    that agents and drivers in the cluster connect to."""
    volume, mount = _token_volume(secret_name)
    container = {
        "name": "head",
        "image": image,
        "command": [
            python,
            "-m",
            "nbcluster",
            "head",
            "--host",
            "0.0.0.0",
            "--port",
            str(int(port)),
            "--token-file",
            TOKEN_PATH,
            "--state-file",
            "/var/lib/nbcluster/head.state",
        ],
        "ports": [{"name": "nbcluster", "containerPort": int(port), "protocol": "TCP"}],
        "volumeMounts": [mount, {"name": "state", "mountPath": "/var/lib/nbcluster"}],
        "resources": _resources(cpus, memory, 0),
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": dns_name(name), "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "containers": [container],
                    "volumes": [volume, {"name": "state", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": dns_name(name), "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "selector": dict(labels),
            "ports": [
                {"name": "nbcluster", "port": int(port), "targetPort": int(port), "protocol": "TCP"}
            ],
        },
    }
    return [deployment, service]
