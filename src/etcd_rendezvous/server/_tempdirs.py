"""Temporary etcd dirs: who owns them, and removing those of dead owners.

etcd preallocates its WAL (64 MB segment files, about 123 MB per member before the
first write; etcd 3.4 and 3.5 have no flag to make them smaller: ``SegmentSizeBytes``
is a package variable only their tests change). A parent killed by SIGKILL cannot
remove its temporary dir, so each one leaves that much in the temp dir.

Every temporary dir this package creates (:func:`make_temp_dir`) holds an owner
marker (:data:`OWNER_FILE`): the creating process's pid and its start time from
``/proc/PID/stat`` (so a reused pid is not mistaken for the owner), the kernel's boot
id, the pid namespace and the host name. :func:`remove_stale_dirs`, called by every
:class:`EtcdServer` and :class:`EtcdCluster` start that creates a temporary dir,
removes the dirs under the temp root whose owner is certainly dead and that no running
process (an orphaned etcd) uses. It never removes:

* a dir without a readable marker (older versions, or one being created now), and so
  never a dir the user passed (markers are only written into dirs we created);
* a dir whose owner is alive, or whose liveness cannot be judged from here (another
  pid namespace, another host sharing the temp dir, no ``/proc``: only Linux judges);
* a dir owned by another user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

PREFIX = "etcd-rendezvous-"
"""Every temporary dir of this package starts with this (``etcd-rendezvous-cluster-`` too)."""

OWNER_FILE = "etcd-rendezvous-owner.json"
_MARKER_VERSION = 1


@dataclass(frozen=True)
class Owner:
    """The identity of the process that created a temporary dir."""

    pid: int
    start_time: int | None  # clock ticks after boot, field 22 of /proc/PID/stat
    boot_id: str | None
    pid_namespace: str | None
    host: str


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (``None`` when there is no such process or no /proc)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) is in parentheses and may contain spaces and ")".
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    return _read("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def current_owner() -> Owner:
    pid = os.getpid()
    return Owner(pid, process_start_time(pid), _boot_id(), _pid_namespace(), socket.gethostname())


def write_owner(directory: str, owner: Owner | None = None) -> None:
    """Record ``owner`` (default: this process) in ``directory`` (atomically)."""
    owner = owner or current_owner()
    record = {
        "version": _MARKER_VERSION,
        "pid": owner.pid,
        "ppid": os.getppid(),
        "start_time": owner.start_time,
        "boot_id": owner.boot_id,
        "pid_namespace": owner.pid_namespace,
        "host": owner.host,
    }
    path = os.path.join(directory, OWNER_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def read_owner(directory: str) -> Owner | None:
    """The owner recorded in ``directory``, or ``None`` without a readable marker."""
    text = _read(os.path.join(directory, OWNER_FILE))
    if text is None:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or record.get("version") != _MARKER_VERSION:
            return None
        pid, start = record["pid"], record["start_time"]
        if not isinstance(pid, int) or not (start is None or isinstance(start, int)):
            return None
        boot, pidns, host = record["boot_id"], record["pid_namespace"], record["host"]
        return Owner(
            pid,
            start,
            boot if isinstance(boot, str) else None,
            pidns if isinstance(pidns, str) else None,
            str(host),
        )
    except (ValueError, KeyError, TypeError):
        return None


def owner_is_dead(owner: Owner, here: Owner | None = None) -> bool:
    """True only when ``owner`` has certainly exited (any doubt: ``False``).

    ``here`` is this process (:func:`current_owner`), passed when judging many.
    """
    if not sys.platform.startswith("linux"):
        return False
    here = here or current_owner()
    if owner.host != here.host:
        return False  # a temp dir shared with another machine: cannot judge
    if owner.boot_id is not None and here.boot_id is not None and owner.boot_id != here.boot_id:
        return True  # this machine rebooted since: every process of that boot is gone
    if owner.pid_namespace is None or owner.pid_namespace != here.pid_namespace:
        return False  # another container: its pids mean nothing here
    if owner.start_time is None:
        return False
    start = process_start_time(owner.pid)
    if start is None:
        return not os.path.exists(f"/proc/{owner.pid}")
    return start != owner.start_time  # the pid was reused by a newer process


def _processes_using(directory: str) -> list[int]:
    """Pids whose command line names a path in ``directory`` (an etcd that outlived us)."""
    needle = os.fsencode(directory.rstrip("/") + "/")
    exact = os.fsencode(directory.rstrip("/"))
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [-1]  # cannot tell: treat as in use
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(arg == exact or arg.startswith(needle) for arg in args):
            found.append(int(entry))
    return found


def make_temp_dir(prefix: str = PREFIX) -> str:
    """A new private temporary dir with this process's owner marker, stale dirs removed first."""
    root = tempfile.gettempdir()
    remove_stale_dirs(root)
    path = tempfile.mkdtemp(prefix=prefix, dir=root)
    try:
        write_owner(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _candidates(root: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except OSError:
        return
    uid = os.getuid() if hasattr(os, "getuid") else None
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if uid is not None and entry.stat(follow_symlinks=False).st_uid != uid:
                continue
        except OSError:
            continue
        yield entry


def _remove(path: str) -> bool:
    """Remove ``path``, its owner marker last: a removal cut short is retried next time."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    for name in names:
        if name == OWNER_FILE:
            continue
        child = os.path.join(path, name)
        if os.path.isdir(child) and not os.path.islink(child):
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(child)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, OWNER_FILE))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(path)
    return True


def remove_stale_dirs(root: str | None = None) -> list[str]:
    """Remove our temporary dirs under ``root`` whose owner is dead and unused; return them.

    ``root`` defaults to the temp dir. Never raises: a dir that cannot be removed is
    logged and left for the next start.
    """
    root = root if root is not None else tempfile.gettempdir()
    removed: list[str] = []
    here = current_owner()
    for entry in _candidates(root):
        path = entry.path
        owner = read_owner(path)
        if owner is None or not owner_is_dead(owner, here):
            continue
        users = _processes_using(path)
        if users:
            log.info("keeping %s: owner pid %d is dead, but pids %s use it", path, owner.pid, users)
            continue
        log.info("removing %s, left behind by pid %d, which is dead", path, owner.pid)
        try:
            _remove(path)
        except OSError as exc:
            log.warning("could not remove %s (%s); the next start tries again", path, exc)
            continue
        if os.path.exists(path):
            log.warning("could not remove all of %s; the next start tries again", path)
            continue
        removed.append(path)
    return removed
