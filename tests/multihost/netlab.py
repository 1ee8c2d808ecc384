"""A multi-host test bed on one Linux machine (issue 11): each host is a network namespace.

Run as root. A :class:`Lab` makes a bridge in the root namespace (with address ``.1``
of a free ``10.213.X.0/24``, so the test process can reach every host) and, per host,
a network namespace with a veth pair: the namespace's end holds the host's address
(``.2``, ``.3``, ...), the other end is a port of the bridge. Every host has a name
(its host name too: processes run in their own UTS namespace) that every host resolves
through its own hosts file, ``/etc/netns/<netns>/hosts``, which ``ip netns exec``
bind-mounts over ``/etc/hosts``.

Faults are real:

* :meth:`Host.kill` SIGKILLs every process in the host's namespace (agents, their
  workers in other sessions, etcd): the kernel stays, so connections to the host are
  refused, as when a machine's processes die;
* :meth:`Host.partition` sets the bridge side of its veth down: packets are dropped,
  connections to and from it time out instead of being refused; :meth:`Host.heal`
  sets it up again. ``power_off=True`` on :meth:`Host.kill` does both: a machine gone.

Everything a lab creates (namespaces, links, the bridge, hosts files, processes) is
named ``mh<pid>l<n>...`` and removed when the lab closes -- by the context manager, or
at interpreter exit as a backstop. A new lab first removes what labs of dead processes
left behind (the owner pid is in the name).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
HOSTS_DIR = Path("/etc/netns")
SUBNET_BASE = "10.213"
_NAME = re.compile(r"^mh(\d+)l\d+")
_labs = itertools.count()
_open: set[Lab] = set()
_open_lock = threading.Lock()


class LabError(RuntimeError):
    """A lab could not be built, or a host could not be driven."""


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError as exc:
        raise LabError("`ip` (iproute2) is not installed: apt-get install -y iproute2") from exc
    if check and done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unavailable() -> str | None:
    """Why a lab cannot be built here (``None``: it can)."""
    if os.geteuid() != 0:
        return "the multi-host test bed needs root (network namespaces, veth, a bridge)"
    if shutil.which("ip") is None:
        return "the multi-host test bed needs `ip` (apt-get install -y iproute2)"
    probe = f"mh{os.getpid()}l99probe"
    try:
        _ip("netns", "add", probe)
    except LabError as exc:
        return f"cannot create a network namespace here: {exc}"
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(netns: str) -> list[int]:
    """Pids of the processes in network namespace ``netns`` (what `ip netns pids` says)."""
    try:
        inode = (NETNS_DIR / netns).stat().st_ino
    except OSError:
        return []
    pids: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                pids.append(int(entry))
        except OSError:
            continue  # gone, or a zombie
    return pids


def _kill_netns_processes(netns: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while pids := _netns_pids(netns):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise LabError(f"processes in network namespace {netns} survive SIGKILL: {pids}")
        time.sleep(0.02)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def clean_stale() -> list[str]:
    """Remove namespaces, links and hosts files of labs whose owner process is dead."""
    removed: list[str] = []
    names = {p.name for p in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()
    for name in sorted(names):
        match = _NAME.match(name)
        if match and not _pid_alive(int(match[1])):
            _kill_netns_processes(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show").splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        link = parts[1].strip().partition("@")[0]
        match = _NAME.match(link)
        if match and not _pid_alive(int(match[1])):
            _ip("link", "del", link, check=False)
            removed.append(link)
    if HOSTS_DIR.is_dir():
        for entry in HOSTS_DIR.iterdir():
            match = _NAME.match(entry.name)
            if match and not _pid_alive(int(match[1])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(str(entry))
        with contextlib.suppress(OSError):
            HOSTS_DIR.rmdir()  # only if empty: it may hold someone else's files
    for entry in Path(tempfile.gettempdir()).glob("mh*"):
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    if removed:
        log.info("removed what dead labs left behind: %s", ", ".join(removed))
    return removed


class Host:
    """One host of a :class:`Lab`: a network namespace with an address and a name."""

    def __init__(self, lab: Lab, index: int, name: str, address: str) -> None:
        self.lab = lab
        self.index = index
        self.name = name
        self.address = address
        self.netns = f"{lab.prefix}n{index}"
        self.veth = f"{lab.prefix}v{index}"  # the bridge's end; "eth0" inside
        self.tmpdir = lab.workdir / "tmp" / name  # this host's TMPDIR (its /tmp, in effect)
        self.procs: list[subprocess.Popen[Any]] = []
        self.partitioned = False

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address})"

    @property
    def hosts_file(self) -> Path:
        return HOSTS_DIR / self.netns / "hosts"

    def spawn(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        text: bool = False,
        cwd: str | None = None,
        own_tmp: bool = True,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` on this host: in its network namespace, with its hosts file as
        ``/etc/hosts``, its name as host name, its own ``TMPDIR`` (unless ``env`` sets
        one: temporary files such as the embedded election's lock files are per host, as
        on real machines), in a new session (process group)."""
        wrapped = [
            "ip", "netns", "exec", self.netns,
            "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.name,
            *argv,
        ]  # fmt: skip
        environ = dict(os.environ if env is None else env)
        if own_tmp:
            environ["TMPDIR"] = str(self.tmpdir)
        proc = subprocess.Popen(
            wrapped,
            env=environ,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            text=text,
            cwd=cwd,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float = 30.0) -> str:
        """Run ``argv`` on this host to completion; its stdout (LabError if it fails)."""
        proc = self.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise LabError(f"{self.name}: {list(argv)} did not finish in {timeout} s") from None
        if proc.returncode != 0:
            raise LabError(f"{self.name}: {list(argv)} failed ({proc.returncode}): {err}")
        return str(out)

    def pids(self) -> list[int]:
        """Every process on this host (in its network namespace)."""
        return _netns_pids(self.netns)

    def kill(self, power_off: bool = False) -> None:
        """SIGKILL every process on this host and reap the ones we started. With
        ``power_off``, the link goes down too: a machine gone, not just its processes."""
        if power_off:
            self.partition()
        _kill_netns_processes(self.netns)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        log.info("%s: killed every process%s", self.name, " and its link" if power_off else "")

    def partition(self) -> None:
        """Cut this host off the bridge: packets dropped, connections time out."""
        _ip("link", "set", self.veth, "down")
        self.partitioned = True
        log.info("%s (%s): partitioned", self.name, self.address)

    def heal(self) -> None:
        _ip("link", "set", self.veth, "up")
        self.partitioned = False
        log.info("%s (%s): healed", self.name, self.address)

    def resolve(self, name: str, address: str) -> None:
        """Make ``name`` resolve to ``address`` on this host (its hosts file, rewritten in
        place: running processes see it at their next lookup)."""
        self.lab.entries[self.name][name] = address
        self.lab.write_hosts_file(self)


class Lab:
    """N hosts on one bridge; a context manager that leaves nothing behind.

    ``names``: the hosts' names (resolvable on every host); ``n``: ``h0``... ``h<n-1>``.
    """

    def __init__(self, names: Iterable[str] | int) -> None:
        self.names = [f"h{i}" for i in range(names)] if isinstance(names, int) else list(names)
        if not self.names or len(self.names) > 60 or len(set(self.names)) != len(self.names):
            raise LabError(f"a lab needs 1 to 60 distinct host names, got {self.names}")
        self.prefix = f"mh{os.getpid()}l{next(_labs)}"
        self.bridge = f"{self.prefix}b"
        self.hosts: dict[str, Host] = {}
        self.entries: dict[str, dict[str, str]] = {}
        self.network: ipaddress.IPv4Network | None = None
        self.gateway = ""
        self.workdir = Path(tempfile.gettempdir()) / self.prefix  # the hosts' data; removed
        self._closed = False

    def __enter__(self) -> Lab:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def open(self) -> None:
        reason = unavailable()
        if reason:
            raise LabError(reason)
        with _open_lock:
            _open.add(self)
        try:
            NETNS_DIR.mkdir(parents=True, exist_ok=True)
            with _locked(NETNS_DIR):  # choose a subnet and claim it, one lab at a time
                clean_stale()
                self.workdir.mkdir(mode=0o700)
                self.network = self._free_subnet()
                hosts = list(self.network.hosts())
                self.gateway = str(hosts[0])
                _ip("link", "add", self.bridge, "type", "bridge")
                _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            for index, name in enumerate(self.names):
                host = Host(self, index, name, str(hosts[index + 1]))
                self.hosts[name] = host
                self._make(host)
            all_names = {h.name: h.address for h in self.hosts.values()}
            for host in self.hosts.values():
                self.entries[host.name] = dict(all_names)
                self.write_hosts_file(host)
        except BaseException:
            self.close()
            raise
        log.info("lab %s: %s on %s", self.prefix, list(self.hosts.values()), self.network)

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = set()
        for line in _ip("-o", "-4", "addr", "show").splitlines() + _ip("-4", "route").splitlines():
            for word in line.split():
                with contextlib.suppress(ValueError):
                    used.add(ipaddress.ip_interface(word).network)
        start = os.getpid() % 250
        for offset in range(250):
            net = ipaddress.IPv4Network(f"{SUBNET_BASE}.{(start + offset) % 250 + 1}.0/24")
            if not any(net.overlaps(u) for u in used):
                return net
        raise LabError(f"no free {SUBNET_BASE}.X.0/24 subnet (all in use)")

    def _make(self, host: Host) -> None:
        host.tmpdir.mkdir(parents=True, mode=0o700)
        _ip("netns", "add", host.netns)
        peer = f"{self.prefix}p{host.index}"
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", host.netns)
        _ip("link", "set", peer, "name", "eth0", netns=host.netns)
        _ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=host.netns)
        _ip("link", "set", "eth0", "up", netns=host.netns)
        _ip("link", "set", "lo", "up", netns=host.netns)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")

    def write_hosts_file(self, host: Host) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{address} {name}" for name, address in self.entries[host.name].items()]
        host.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        with host.hosts_file.open("w") as fh:  # same inode: bind mounts see the change
            fh.write("\n".join(lines) + "\n")

    def close(self) -> None:
        """Kill every process on every host, remove namespaces, links, hosts files."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for host in self.hosts.values():
            try:
                _kill_netns_processes(host.netns)
            except LabError as exc:
                errors.append(str(exc))
            for proc in host.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.veth, check=False)
            shutil.rmtree(HOSTS_DIR / host.netns, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            HOSTS_DIR.rmdir()
        with _open_lock:
            _open.discard(self)
        if errors:
            raise LabError("; ".join(errors))

    def leftovers(self) -> list[str]:
        """What of this lab still exists (empty after :meth:`close`)."""
        return leftovers(self.prefix)


def leftovers(prefix: str) -> list[str]:
    """Namespaces, links, hosts files and data dirs whose name starts with ``prefix``."""
    found = [str(p) for p in NETNS_DIR.glob(f"{prefix}*")] if NETNS_DIR.is_dir() else []
    for line in _ip("-o", "link", "show").splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1 and parts[1].strip().startswith(prefix):
            found.append(parts[1].strip())
    found += [str(p) for p in HOSTS_DIR.glob(f"{prefix}*")] if HOSTS_DIR.is_dir() else []
    found += [str(p) for p in Path(tempfile.gettempdir()).glob(f"{prefix}*")]
    return found


@atexit.register
def _close_all() -> None:
    with _open_lock:
        labs = list(_open)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()
