"""Hosts with their own network addresses: network namespaces on a bridge, made by the test.

Layout (all created and removed here, as root): a bridge in the root namespace holds this
process (``SUBNET.1``); each host is a namespace joined to the bridge by a veth pair
(``SUBNET.2``, ``SUBNET.3``, ...). Cutting a host's veth simulates a network partition. Nothing
leaves the machine. Callers skip with :func:`namespaces_unavailable`'s reason where namespaces
cannot be made (not root, no ``ip``).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (iproute2)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or ``None``."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    name = f"nbcprobe{os.getpid()}"
    if ip("netns", "add", name, check=False).returncode != 0:
        return "cannot create network namespaces here"
    ip("netns", "del", name, check=False)
    return None


@dataclass
class Net:
    """A bridge and namespace hosts on it."""

    bridge: str
    subnet: str  # "10.N.M"
    hosts: dict[str, str]  # name -> address
    veths: dict[str, str]  # name -> root-side veth

    @property
    def head_ip(self) -> str:
        """The root namespace's address on the bridge."""
        return f"{self.subnet}.1"

    def ns(self, host: str) -> str:
        """The namespace of ``host``."""
        return f"{self.bridge}-{host}"

    def netns(self, host: str) -> list[str]:
        """Command prefix running a program in ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns(host)]

    def pids(self, host: str) -> set[int]:
        """Processes running in ``host``'s namespace."""
        out = ip("netns", "pids", self.ns(host), check=False).stdout
        return {int(w) for w in out.split()}

    def cut(self, host: str) -> None:
        """Take ``host``'s link down (a network partition)."""
        ip("link", "set", self.veths[host], "down")

    def heal(self, host: str) -> None:
        """Bring ``host``'s link back."""
        ip("link", "set", self.veths[host], "up")


@contextlib.contextmanager
def namespace_net(names: Sequence[str]) -> Iterator[Net]:
    """A bridge with one namespace host per name; everything is removed on exit."""
    tag = f"{os.getpid() % 10000}{random.randint(0, 99)}"
    bridge = f"nbcbr{tag}"
    subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 250)}"
    made_ns: list[str] = []
    veths: dict[str, str] = {}
    try:
        ip("link", "add", "name", bridge, "type", "bridge")
        ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        hosts = {}
        for i, host in enumerate(names, start=2):
            ns = f"{bridge}-{host}"
            ip("netns", "add", ns)
            made_ns.append(ns)
            outer, inner = f"nbv{tag}{host}", f"nbi{tag}{host}"
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            veths[host] = outer
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "master", bridge)
            ip("link", "set", outer, "up")
            ip("-n", ns, "addr", "add", f"{subnet}.{i}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            hosts[host] = f"{subnet}.{i}"
        yield Net(bridge, subnet, hosts, veths)
    finally:
        for outer in veths.values():
            ip("link", "del", outer, check=False)
        for ns in made_ns:
            # Whatever a test left running there would keep the namespace (and its sockets).
            for pid in ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            ip("netns", "del", ns, check=False)
        ip("link", "del", bridge, check=False)
