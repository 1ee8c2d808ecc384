"""EtcdCluster: a local N-member etcd cluster on loopback, for fault tests and demos."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import urllib3

from etcd_rendezvous.errors import EtcdRendezvousError, EtcdServerError, EtcdStartError
from etcd_rendezvous.server._binary import etcd_version, find_etcd_binary
from etcd_rendezvous.server._ports import (
    NoFreePortError,
    format_host,
    free_ports,
    http_url,
    looks_like_bind_error,
)
from etcd_rendezvous.server._process import (
    DEFAULT_STOP_TIMEOUT,
    ChildExitedError,
    EtcdProcess,
    HealthChecker,
    TLSCheckError,
    register_for_exit,
    unregister_for_exit,
    wait_until_ready,
)
from etcd_rendezvous.server._security import ROOT, TLSConfig, client_kwargs, enable_root_auth
from etcd_rendezvous.server._tempdirs import PREFIX, make_temp_dir
from etcd_rendezvous.server.server import etcd_argv, host_error

if TYPE_CHECKING:
    from etcd_rendezvous.client import EtcdClient

log = logging.getLogger(__name__)

# Safe on a loaded 2-core machine: a heartbeat missed under load must not cost a leader.
CLUSTER_HEARTBEAT_INTERVAL_MS = 100
CLUSTER_ELECTION_TIMEOUT_MS = 1000
MEMBER_POLL_INTERVAL = 0.005
PORTS_FILE = "etcd-rendezvous-cluster.json"


class EtcdClusterMember:
    """One member of an :class:`EtcdCluster`; its ports and data dir never change."""

    def __init__(
        self,
        cluster: EtcdCluster,
        name: str,
        data_dir: str,
        log_file: str,
    ) -> None:
        self._cluster = cluster
        self.name = name
        self.data_dir = data_dir
        self.log_file = log_file
        self.client_port = 0
        self.peer_port = 0
        self._proc: EtcdProcess | None = None
        self._lock = threading.RLock()

    # --- addresses ---------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._cluster.host

    @property
    def endpoint(self) -> str:
        return f"{format_host(self.host)}:{self.client_port}"

    @property
    def url(self) -> str:
        """The client URL (``https://`` when the cluster has TLS)."""
        return http_url(self.host, self.client_port, self._cluster.scheme)

    @property
    def peer_url(self) -> str:
        return http_url(self.host, self.peer_port)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def process(self) -> EtcdProcess | None:
        return self._proc

    @property
    def is_running(self) -> bool:
        """True while the process exists (a paused member is still running)."""
        proc = self._proc
        return proc is not None and proc.is_running

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running else "stopped"
        return f"<EtcdClusterMember {self.name} {self.endpoint} {state}>"

    # --- lifecycle -----------------------------------------------------------------------

    def _spawn(self) -> EtcdProcess:
        with self._lock:
            if not self.client_port:
                raise EtcdServerError(f"{self!r}: start the cluster first")
            if self.is_running:
                raise EtcdServerError(f"{self!r} is already running")
            argv = etcd_argv(
                self._cluster.binary,
                name=self.name,
                data_dir=self.data_dir,
                host=self.host,
                client_port=self.client_port,
                peer_port=self.peer_port,
                initial_cluster=self._cluster.initial_cluster,
                cluster_token=self._cluster.token,
                heartbeat_interval_ms=self._cluster.heartbeat_interval_ms,
                election_timeout_ms=self._cluster.election_timeout_ms,
                extra_args=self._cluster.extra_args,
                tls=self._cluster.tls,
            )
            log.info("starting etcd member %s on %s", self.name, self.url)
            self._proc = EtcdProcess.spawn(argv, log_path=self.log_file)
            return self._proc

    def is_healthy(self) -> bool:
        """One ``GET /health``: the member answers and sees a leader."""
        check = HealthChecker(self.host, self.client_port, tls=self._cluster.tls)
        try:
            return check()
        finally:
            check.close()

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until this member is healthy (which needs a quorum of the cluster)."""
        proc = self._proc
        if proc is None:
            raise EtcdServerError(f"{self!r} is not running")
        check = HealthChecker(self.host, self.client_port, tls=self._cluster.tls)
        try:
            wait_until_ready(
                [proc], [check], time.monotonic() + timeout, interval=MEMBER_POLL_INTERVAL
            )
        except ChildExitedError as exc:
            tail = proc.log_tail()
            raise EtcdStartError(
                f"etcd member {self.name} exited with code {proc.returncode}; last lines of "
                f"{proc.log_path}:\n{tail}",
                returncode=proc.returncode,
                log_tail=tail,
            ) from exc
        except TLSCheckError as exc:
            tail = proc.log_tail()
            raise EtcdStartError(
                f"etcd member {self.name} on {self.url}: {exc}", log_tail=tail
            ) from exc
        except TimeoutError:
            tail = proc.log_tail()
            raise EtcdStartError(
                f"etcd member {self.name} on {self.url} was not healthy within {timeout} s; "
                f"last lines of {proc.log_path}:\n{tail}",
                log_tail=tail,
            ) from None
        finally:
            check.close()

    def start(self, timeout: float = 60, *, wait: bool = True) -> None:
        """Start a stopped member on its old ports and data; wait until it is healthy."""
        self._spawn()
        if wait:
            self.wait_ready(timeout)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM, bounded wait, SIGKILL; the data dir is kept. Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                log.info("stopping etcd member %s (pid %d)", self.name, proc.pid)
                proc.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the member at once (a crash); the data dir is kept."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                log.info("killing etcd member %s (pid %d)", self.name, proc.pid)
                proc.kill()

    def restart(self, timeout: float = 60, *, wait: bool = True) -> None:
        """Stop (if running) and start again on the same ports and data."""
        self.stop()
        self.start(timeout, wait=wait)

    def pause(self) -> None:
        """SIGSTOP: the member hangs (no answers, no heartbeats) until :meth:`resume`."""
        proc = self._proc
        if proc is None:
            raise EtcdServerError(f"{self!r} is not running")
        proc.pause()

    def resume(self) -> None:
        """SIGCONT a paused member."""
        proc = self._proc
        if proc is None:
            raise EtcdServerError(f"{self!r} is not running")
        proc.resume()

    def status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The member's ``/v3/maintenance/status`` reply, or ``None`` if it does not answer."""
        tls = self._cluster.tls
        host = self.host.strip("[]")
        pool: urllib3.HTTPConnectionPool
        if tls is None:
            pool = urllib3.HTTPConnectionPool(
                host, self.client_port, maxsize=1, retries=False, timeout=timeout
            )
        else:
            pool = urllib3.HTTPSConnectionPool(
                host,
                self.client_port,
                maxsize=1,
                retries=False,
                timeout=timeout,
                **tls.pool_kwargs(),
            )
        try:
            headers: dict[str, str] = {}
            password = self._cluster._root_password
            if password is not None:
                # etcd 3.5.30 and 3.6 want a token for the status call too (3.4, 3.5.1 don't).
                auth = pool.request(
                    "POST",
                    "/v3/auth/authenticate",
                    body=json.dumps({"name": ROOT, "password": password}).encode(),
                    retries=False,
                )
                token = json.loads(auth.data).get("token") if auth.status == 200 else None
                if token:  # else auth is not on yet (the cluster is starting): ask without
                    headers["Authorization"] = str(token)
            response = pool.request(
                "POST", "/v3/maintenance/status", body=b"{}", headers=headers, retries=False
            )
            if response.status != 200:
                return None
            body = json.loads(response.data)
            return body if isinstance(body, dict) else None
        except (urllib3.exceptions.HTTPError, ValueError):
            return None
        finally:
            pool.close()


class EtcdCluster:
    """A local etcd cluster: ``members`` processes on loopback, one data dir each.

    Usage::

        with EtcdCluster(3) as cluster:
            client = cluster.get_client()
            cluster.members[0].kill()
            ...
            cluster.members[0].start()

    Args:
        members: number of members (1 or more; 3 tolerates one failure).
        binary, host, extra_args: as for :class:`EtcdServer`.
        data_dir: parent of the members' data dirs (``<data_dir>/<name>``), kept by
            ``stop()``. Default: a temporary dir removed by ``stop()``.
        heartbeat_interval_ms, election_timeout_ms: raft timers; the defaults
            (100 ms / 1 s) keep a loaded 2-core machine from losing its leader.
        stop_timeout: seconds each member gets after SIGTERM before SIGKILL.
        tls, root_password: as for :class:`EtcdServer` (TLS on every member's client
            URL; auth enabled once the new cluster is healthy).
    """

    def __init__(
        self,
        members: int = 3,
        *,
        binary: str | None = None,
        host: str = "127.0.0.1",
        data_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        heartbeat_interval_ms: int = CLUSTER_HEARTBEAT_INTERVAL_MS,
        election_timeout_ms: int = CLUSTER_ELECTION_TIMEOUT_MS,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        name_prefix: str = "member",
        tls: TLSConfig | None = None,
        root_password: str | None = None,
    ) -> None:
        if members < 1:
            raise ValueError(f"an etcd cluster needs at least 1 member, not {members}")
        if root_password is not None and not root_password:
            raise ValueError("root_password must not be empty")
        self.tls = tls
        self._root_password = root_password
        self.binary = find_etcd_binary(binary)
        self.host = host
        self.extra_args = list(extra_args)
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.stop_timeout = stop_timeout
        self._size = members
        self._name_prefix = name_prefix
        self._user_data_dir = os.path.abspath(data_dir) if data_dir is not None else None
        self._workdir: str | None = None
        self._members: list[EtcdClusterMember] = []
        self._lock = threading.RLock()
        self.token = ""

    # --- addresses ---------------------------------------------------------------------

    @property
    def members(self) -> list[EtcdClusterMember]:
        return list(self._members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self._members]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self._members]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self._members)

    @property
    def version(self) -> str:
        return etcd_version(self.binary)

    @property
    def data_dir(self) -> str | None:
        return self._user_data_dir or self._workdir

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def auth_enabled(self) -> bool:
        """True when the cluster runs with authentication (``root_password``)."""
        return self._root_password is not None

    def get_client(self, **kwargs: Any) -> EtcdClient:
        """A v3 :class:`~etcd_rendezvous.client.EtcdClient` over every member's URL.

        It uses the cluster's TLS files and root credentials (:meth:`client_kwargs`);
        ``kwargs`` go to the client and win over those.
        """
        from etcd_rendezvous.client import EtcdClient

        return EtcdClient(self.urls, **{**self.client_kwargs(), **kwargs})

    def client_kwargs(self) -> dict[str, Any]:
        """TLS files and root credentials a client of this cluster needs (or ``{}``)."""
        return client_kwargs(self.tls, self._root_password)

    def leader(self) -> EtcdClusterMember | None:
        """The member that is raft leader now, or ``None`` when none answers as leader."""
        for member in self._members:
            if not member.is_running:
                continue
            status = member.status()
            if status is None:
                continue
            header = status.get("header", {})
            if str(status.get("leader", "")) == str(header.get("member_id", "-")):
                return member
        return None

    def __repr__(self) -> str:
        return f"<EtcdCluster {self.endpoints} binary={self.binary!r}>"

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 60, num_retries: int = 3) -> None:
        """Start every member and return once all are healthy (the cluster has a leader).

        Retries with fresh ports (and clean data dirs) when a port was taken before
        etcd bound it.
        """
        with self._lock:
            if any(m.is_running for m in self._members):
                raise EtcdServerError(f"{self!r} is already running")
            deadline = time.monotonic() + timeout
            base = self._user_data_dir
            if base is None:
                base = self._workdir = make_temp_dir(f"{PREFIX}cluster-")
            else:
                os.makedirs(base, exist_ok=True)
            if not self._members:
                self._members = [
                    EtcdClusterMember(
                        self,
                        f"{self._name_prefix}{i}",
                        os.path.join(base, f"{self._name_prefix}{i}"),
                        os.path.join(self._workdir or base, f"{self._name_prefix}{i}.log"),
                    )
                    for i in range(self._size)
                ]
            may_wipe = all(not os.path.exists(m.data_dir) for m in self._members)
            if not may_wipe:
                self._load_ports()
            try:
                self._start(deadline, max(1, num_retries), may_wipe)
            except BaseException:
                self.stop()
                raise
            register_for_exit(self)

    def _start(self, deadline: float, attempts: int, may_wipe: bool) -> None:
        for attempt in range(attempts):
            if attempt > 0 or not self._members[0].client_port:
                try:
                    ports = free_ports(2 * self._size, self.host)
                except (
                    OSError,
                    NoFreePortError,
                ) as exc:  # not an address of this machine, or no such name
                    raise EtcdStartError(host_error(self.host, exc)) from exc
                for i, member in enumerate(self._members):
                    member.client_port, member.peer_port = ports[2 * i], ports[2 * i + 1]
                self.token = f"etcd-rendezvous-{ports[0]}"
            if attempt > 0 and may_wipe:
                for member in self._members:
                    shutil.rmtree(member.data_dir, ignore_errors=True)
            procs = [member._spawn() for member in self._members]
            checks = [HealthChecker(m.host, m.client_port, tls=self.tls) for m in self._members]
            try:
                wait_until_ready(procs, checks, deadline, interval=MEMBER_POLL_INTERVAL)
            except ChildExitedError as exc:
                tail = exc.proc.log_tail()
                self._stop_members()
                if looks_like_bind_error(tail) and attempt + 1 < attempts:
                    log.warning("an etcd member could not bind its ports; retrying with fresh ones")
                    continue
                # Logs in our temporary dir are removed with it: cite only a kept one.
                where = f" ({exc.proc.log_path})" if self._user_data_dir is not None else ""
                raise EtcdStartError(
                    f"etcd cluster member (pid {exc.proc.pid}) exited with code "
                    f"{exc.proc.returncode} during start; last lines of its log{where}:\n"
                    f"{tail}",
                    returncode=exc.proc.returncode,
                    log_tail=tail,
                ) from None
            except TLSCheckError as exc:
                tails = "\n".join(
                    f"--- {m.name}:\n{m.process.log_tail(5)}" for m in self._members if m.process
                )
                raise EtcdStartError(
                    f"etcd cluster {self.urls} started, but {exc}; check the TLSConfig files\n"
                    f"{tails}",
                    log_tail=tails,
                ) from exc
            except TimeoutError:
                tails = "\n".join(
                    f"--- {m.name}:\n{m.process.log_tail(5)}" for m in self._members if m.process
                )
                raise EtcdStartError(
                    f"etcd cluster {self.endpoints} was not healthy before the start timeout\n"
                    f"{tails}",
                    log_tail=tails,
                ) from None
            finally:
                for check in checks:
                    check.close()
            log.info("etcd cluster ready on %s", ",".join(self.endpoints))
            if self._root_password is not None:
                self._enable_auth(self._root_password, deadline)
            self._save_ports()
            return

    def _enable_auth(self, password: str, deadline: float) -> None:
        from etcd_rendezvous.client import EtcdClient

        timeout = max(1.0, min(5.0, deadline - time.monotonic()))
        tls = self.tls.client_kwargs() if self.tls is not None else {}
        where = ",".join(self.urls)
        try:
            with (
                EtcdClient(self.urls, timeout=timeout, **tls) as anonymous,
                self.get_client(timeout=timeout) as root,
            ):
                enable_root_auth(anonymous, root, password, where)
        except EtcdServerError:
            raise
        except EtcdRendezvousError as exc:
            raise EtcdStartError(f"could not enable authentication on {where}: {exc}") from exc

    # etcd keeps each member's peer URLs in its data: a later cluster on the same data
    # dir must use the same ports, so they are saved next to the members' data dirs.

    def _ports_file(self) -> str | None:
        base = self._user_data_dir
        return os.path.join(base, PORTS_FILE) if base is not None else None

    def _save_ports(self) -> None:
        path = self._ports_file()
        if path is None:
            return
        ports = {m.name: [m.client_port, m.peer_port] for m in self._members}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"host": self.host, "token": self.token, "members": ports}, f)
        os.replace(tmp, path)

    def _load_ports(self) -> None:
        path = self._ports_file()
        if path is None:
            return
        try:
            with open(path) as f:
                saved = json.load(f)
            ports = saved["members"]
            for member in self._members:
                member.client_port, member.peer_port = (int(p) for p in ports[member.name])
            self.token = str(saved["token"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EtcdServerError(
                f"cannot reuse the cluster data in {self._user_data_dir}: {path} is unreadable "
                f"({exc}); etcd needs the members' old ports"
            ) from exc

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until every running member is healthy."""
        deadline = time.monotonic() + timeout
        for member in self._members:
            if member.is_running:
                member.wait_ready(max(0.0, deadline - time.monotonic()))

    def _stop_members(self) -> None:
        errors: list[BaseException] = []
        for member in self._members:
            try:
                member.stop(self.stop_timeout)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def stop(self) -> None:
        """Stop every member; remove the data unless it is yours. Idempotent."""
        with self._lock:
            try:
                self._stop_members()
            finally:
                workdir, self._workdir = self._workdir, None
                if workdir is not None:
                    shutil.rmtree(workdir, ignore_errors=True)
                if self._user_data_dir is None:  # their data is gone: new members next time
                    self._members = []
                unregister_for_exit(self)
