"""SSH hosts for tests: OpenSSH servers in network namespaces, made and removed by the test.

Each host of :func:`tests.nethosts.namespace_net` runs its own ``sshd`` on its address only,
with a host key, ``authorized_keys`` and a client key made here. The client side is an
``ssh_config`` written here: one ``Host`` alias per namespace, the test's key, and a
``known_hosts`` file holding the hosts' keys with ``StrictHostKeyChecking yes``, so nothing in
the user's ``~/.ssh`` is read or changed and host keys are checked for real.

``openssh-server`` is installed with apt on first use when ``sshd`` is missing (CI starts from a
fresh Debian as root); the fixtures skip with the reason where that cannot be done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import wait_until
from tests.nethosts import Net, namespace_net, namespaces_unavailable

__all__ = ["Net", "SSHHosts", "namespaces_unavailable", "ssh_hosts", "sshd_unavailable"]

SSHD = "/usr/sbin/sshd"


def sshd_unavailable() -> str | None:
    """Install ``openssh-server`` if ``sshd`` is missing; say why it cannot be, else ``None``."""
    if not os.path.exists(SSHD):
        if os.geteuid() != 0:
            return "openssh-server is not installed, and installing it needs root"
        if shutil.which("apt-get") is None:
            return "openssh-server is not installed, and there is no apt-get to install it"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server"],
        ):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            except subprocess.TimeoutExpired:
                return f"{' '.join(cmd)} did not finish within 10 minutes"
            if r.returncode != 0:
                return f"{' '.join(cmd)} failed: {(r.stderr or r.stdout)[-500:]}"
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "the OpenSSH client (ssh, ssh-keygen) is not installed"
    return None


@dataclass
class SSHHosts:
    """Namespace hosts each running an ``sshd``, and the client configuration that reaches them.

    ``ssh -F config NAME`` logs into host ``NAME`` as this user (root) with the test's key.
    """

    net: Net
    dir: Path
    config: Path
    """The ``ssh_config`` (``-F``): aliases, key, known_hosts, strict host key checking."""
    key: Path
    known_hosts: Path
    sshd: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def ssh(self, host: str, command: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on ``host`` through ``ssh -F config``."""
        return subprocess.run(
            ["ssh", "-F", str(self.config), host, command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def session_pids(self, host: str) -> set[int]:
        """Processes in ``host``'s namespace other than its listening ``sshd``."""
        return self.net.pids(host) - {self.sshd[host].pid}

    def log(self, host: str) -> str:
        """The ``sshd`` log of ``host``."""
        return (self.dir / f"sshd-{host}.log").read_text(errors="replace")


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nbcluster-test", "-f", str(path)],
        check=True,
        timeout=30,
        capture_output=True,
    )
    return path.with_suffix(".pub").read_text().strip()


def _listening(addr: str, port: int = 22) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        try:
            s.connect((addr, port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def ssh_hosts(
    tmp: Path, names: Sequence[str], unreachable: Sequence[str] = ()
) -> Iterator[SSHHosts]:
    """Namespace hosts ``names`` with an ``sshd`` each; ``unreachable`` names get an alias for
    an address on the bridge's subnet where nothing answers.

    The caller checks :func:`namespaces_unavailable` and :func:`sshd_unavailable` first.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    tmp.chmod(0o700)
    key = tmp / "id_test"
    client_pub = _keygen(key)
    (tmp / "authorized_keys").write_text(client_pub + "\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    with namespace_net(names) as net:
        hosts = SSHHosts(net, tmp, tmp / "ssh_config", key, tmp / "known_hosts")
        try:
            known = []
            for name, addr in net.hosts.items():
                host_pub = _keygen(tmp / f"hostkey-{name}")
                known.append(f"{addr} {' '.join(host_pub.split()[:2])}")
                cfg = tmp / f"sshd-{name}.conf"
                cfg.write_text(
                    "\n".join(
                        [
                            f"ListenAddress {addr}",
                            "Port 22",
                            f"HostKey {tmp / f'hostkey-{name}'}",
                            f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
                            f"PidFile {tmp / f'sshd-{name}.pid'}",
                            "PubkeyAuthentication yes",
                            "PasswordAuthentication no",
                            "KbdInteractiveAuthentication no",
                            "PermitRootLogin prohibit-password",
                            "UsePAM no",
                            # The test's files live under /tmp (world-writable): fine for a test.
                            "StrictModes no",
                            "LogLevel VERBOSE",
                            "",
                        ]
                    )
                )
                with open(tmp / f"sshd-{name}.log", "ab") as log:
                    hosts.sshd[name] = subprocess.Popen(
                        [*net.netns(name), SSHD, "-D", "-e", "-f", str(cfg)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
            hosts.known_hosts.write_text("\n".join(known) + "\n")
            lines = []
            aliases = dict(net.hosts)
            for i, name in enumerate(unreachable, start=200):
                aliases[name] = f"{net.subnet}.{i}"  # on the bridge's subnet, nothing there
            for name, addr in aliases.items():
                lines += [f"Host {name}", f"    HostName {addr}"]
            lines += [
                "Host *",
                "    User root",
                f"    IdentityFile {key}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {hosts.known_hosts}",
                "    GlobalKnownHostsFile /dev/null",
                "    StrictHostKeyChecking yes",
                "    BatchMode yes",
                "    ConnectTimeout 5",
                "",
            ]
            hosts.config.write_text("\n".join(lines))
            for name, addr in net.hosts.items():

                def up(name: str = name, addr: str = addr) -> bool:
                    if hosts.sshd[name].poll() is not None:
                        raise RuntimeError(f"sshd for {name} exited:\n{hosts.log(name)}")
                    return _listening(addr)

                wait_until(up, timeout=20)
            yield hosts
        finally:
            for p in hosts.sshd.values():
                if p.poll() is None:
                    p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
