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

from nbcluster.deploy.pool import BackendStatus, JobState, Pool, PoolError

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


#: Container waiting reasons that will not fix themselves: the pod is reported failed.
_STUCK = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"}
)


def pod_status(pod: Mapping[str, Any]) -> BackendStatus:
    """What a pod's ``status`` says, as a pool job's state and reason.

    ``Pending`` (unscheduled: the scheduler's message; pulling: the waiting reason) is pending,
    ``Running`` running, ``Succeeded``/``Failed`` gone (with the container's exit reason). An
    image that cannot be pulled counts as failed: waiting longer does not help.
    """
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    host = str((pod.get("spec") or {}).get("nodeName") or "")
    containers = status.get("containerStatuses") or []
    state = (containers[0].get("state") or {}) if containers else {}
    if phase in ("Succeeded", "Failed"):
        term = state.get("terminated") or {}
        why = ", ".join(
            str(x)
            for x in (
                term.get("reason"),
                f"exit code {term['exitCode']}" if "exitCode" in term else None,
                term.get("message") or status.get("message"),
            )
            if x
        )
        return BackendStatus(JobState.GONE, why or phase, host=host, failed=phase == "Failed")
    if phase == "Running":
        return BackendStatus(JobState.RUNNING, host=host)
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in _STUCK:
        why = f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
        return BackendStatus(JobState.GONE, why, host=host, failed=True)
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            why = f"{cond.get('reason', 'Unschedulable')}: {cond.get('message', '')}"
            return BackendStatus(JobState.PENDING, why.rstrip(": "), host=host)
    return BackendStatus(JobState.PENDING, str(waiting.get("reason") or phase), host=host)


class KubernetesCluster(Pool):
    """Node agents as Kubernetes pods, one pod per job, through the ``kr8s`` client.

    Parameters
    ----------
    image
        A container image with nbcluster (the same version as here) installed.
    namespace
        Where the pods and the Secret go.
    cpus, memory, gpus
        What each pod asks for: CPU and memory requests and limits (``memory="32Gi"``; also
        ``"32GB"``), ``gpus`` whole GPUs as the ``nvidia.com/gpu`` limit. The agent offers the
        same amounts to the cluster.
    python
        The Python in the image (default ``python3``).
    env, node_selector, tolerations, service_account, image_pull_policy
        Passed into each pod's spec.
    kubeconfig, context
        Which cluster (default: ``$KUBECONFIG`` / ``~/.kube/config`` and its current context,
        or the service account when running in a pod).
    **options
        Those of :class:`~nbcluster.deploy.pool.Pool` (``name``, ``lifetime``,
        ``head_timeout``, ...).

    Notes
    -----
    Not tested against a real Kubernetes cluster: the manifests are validated offline against
    the Kubernetes schemas (see docs/scaling-out.md).
    """

    kind = "kubernetes"

    def __init__(
        self,
        image: str,
        *,
        namespace: str = "default",
        cpus: float | None = None,
        memory: str | None = None,
        gpus: int = 0,
        python: str = "python3",
        env: Mapping[str, str] | None = None,
        node_selector: Mapping[str, str] | None = None,
        tolerations: Sequence[Mapping[str, Any]] = (),
        service_account: str | None = None,
        image_pull_policy: str | None = None,
        kubeconfig: str | None = None,
        context: str | None = None,
        **options: Any,
    ) -> None:
        if not image or not isinstance(image, str):
            raise ValueError(f"image must name a container image, got {image!r}")
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise ValueError(f"gpus must be a whole number >= 0 (nvidia.com/gpu), got {gpus!r}")
        if cpus is not None:
            quantity(cpus, "cpus")
        if memory is not None:
            quantity(memory, "memory")
        dns_name(namespace, "namespace")
        super().__init__(python=python, **options)
        self.image = image
        self.namespace = namespace
        self.cpus = cpus
        self.memory = memory
        self.gpus = gpus
        self.env = dict(env or {})
        self.node_selector = dict(node_selector or {})
        self.tolerations = [dict(t) for t in tolerations]
        self.service_account = service_account
        self.image_pull_policy = image_pull_policy
        self.kubeconfig = kubeconfig
        self.context = context
        self.secret_name = f"{self.pool_id}-token"
        self._next = 0  # the next pod's number
        self._api_obj: Any = None
        self._secret_made = False

    # ------------------------------------------------------------------ manifests
    def pod_manifest(self, name: str) -> dict[str, Any]:
        """The pod of job ``name``."""
        command = self.agent_command(
            name,
            token_file=TOKEN_PATH,
            num_cpus=self.cpus,
            num_gpus=self.gpus,
        )
        return worker_pod_manifest(
            name,
            namespace=self.namespace,
            image=self.image,
            command=command,
            secret_name=self.secret_name,
            labels=pool_labels(self.pool_id, "worker"),
            cpus=self.cpus,
            memory=self.memory,
            gpus=self.gpus,
            env=self.env,
            node_selector=self.node_selector,
            tolerations=self.tolerations,
            service_account=self.service_account,
            image_pull_policy=self.image_pull_policy,
        )

    def secret_manifest(self, reveal: bool = False) -> dict[str, Any]:
        """The Secret with the cluster secret (shown as a placeholder unless ``reveal``)."""
        token = self.secret() if reveal else "<the cluster secret>"
        return secret_manifest(
            self.secret_name,
            token,
            namespace=self.namespace,
            labels=pool_labels(self.pool_id, "secret"),
        )

    def manifests(self, count: int = 1) -> list[dict[str, Any]]:
        """What :meth:`scale` to ``count`` would apply: the Secret (its value hidden) and
        ``count`` pods (named as the next jobs would be)."""
        names = [f"{self.pool_id}-{self._next + i}" for i in range(count)]
        return [self.secret_manifest(), *(self.pod_manifest(n) for n in names)]

    # ------------------------------------------------------------------ Pool backend
    def _api(self) -> Any:
        if self._api_obj is None:
            try:
                import kr8s
            except ImportError:
                raise PoolError(
                    "KubernetesCluster needs the kr8s client: pip install 'nbcluster[kubernetes]'"
                ) from None
            try:
                self._api_obj = kr8s.api(
                    kubeconfig=self.kubeconfig, context=self.context, namespace=self.namespace
                )
            except Exception as exc:
                raise PoolError(f"{self.name}: cannot reach a Kubernetes cluster: {exc}") from exc
        return self._api_obj

    def _submit(self, count: int) -> list[str]:
        from kr8s.objects import Pod, Secret

        api = self._api()
        try:
            if not self._secret_made:
                Secret(self.secret_manifest(reveal=True), api=api).create()
                self._secret_made = True
            names = []
            for _ in range(count):
                name = f"{self.pool_id}-{self._next}"
                self._next += 1
                Pod(self.pod_manifest(name), api=api).create()
                names.append(name)
        except Exception as exc:
            raise PoolError(f"{self.name}: Kubernetes refused the pod or Secret: {exc}") from exc
        return names

    def _poll(self, job_ids: Sequence[str]) -> dict[str, BackendStatus]:
        pods = self._api().get(
            "pods",
            namespace=self.namespace,
            label_selector={POOL_LABEL_K8S: self.pool_id},
        )
        wanted = set(job_ids)
        out = {}
        for pod in pods:
            raw = pod.raw
            name = raw["metadata"]["name"]
            if name in wanted:
                out[name] = pod_status(raw)
        return out

    def _cancel(self, job_ids: Sequence[str]) -> None:
        from kr8s.objects import Pod

        api = self._api()
        for name in job_ids:
            try:
                # SIGTERM (the agent drains), SIGKILL after the grace period.
                Pod.get(name, namespace=self.namespace, api=api).delete(grace_period=GRACE_PERIOD_S)
            except Exception as exc:  # already gone: nothing to end
                if "not found" not in str(exc).lower():
                    raise

    def _log_tail(self, job_id: str) -> str:
        from kr8s.objects import Pod

        pod = Pod.get(job_id, namespace=self.namespace, api=self._api())
        return "\n".join(pod.logs(tail_lines=20))

    def _describe(self) -> str:
        what = [f"image {self.image}"]
        if self.cpus is not None:
            what.append(f"{self.cpus:g} CPU")
        if self.memory is not None:
            what.append(str(self.memory))
        if self.gpus:
            what.append(f"{self.gpus} GPU")
        return ", ".join(what)

    def node_resources(self) -> dict[str, float]:
        """What one pod offers (its CPU and GPU requests)."""
        offer = {"GPU": float(self.gpus)} if self.gpus else {}
        if self.cpus is not None:
            offer["CPU"] = float(self.cpus)
        return offer

    def close(self, wait: bool = True, timeout: float = 60.0) -> None:
        """End every pod (drained first), then delete the Secret; idempotent."""
        super().close(wait=wait, timeout=timeout)
        if self._secret_made:
            from kr8s.objects import Secret

            try:
                Secret.get(self.secret_name, namespace=self.namespace, api=self._api()).delete()
                self._secret_made = False
            except Exception as exc:
                if "not found" not in str(exc).lower():
                    raise PoolError(
                        f"{self.name}: could not delete Secret {self.secret_name}: {exc}"
                    ) from exc
