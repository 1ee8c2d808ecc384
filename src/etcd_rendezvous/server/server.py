"""EtcdServer: one local etcd member, a drop-in for torch's ``etcd_server.EtcdServer``.

Differences from torch, all on purpose:

* the host defaults to ``127.0.0.1`` (torch: ``localhost``, which may resolve to ``::1``
  first); etcd listens on loopback only unless you pass another host;
* readiness is ``GET /health`` polled every millisecond (torch sleeps 1 s), and a single
  member runs with short raft timers, so ``start()`` takes tens of milliseconds;
* ``timeout`` bounds the whole ``start()``, retries included; retries happen only when
  a port was taken between choosing it and etcd binding it (fresh ports each time);
* a ``data_dir`` you pass is yours: it is used as etcd's data dir as is, survives
  ``stop()``, and a later start on it sees the old data (torch deletes it);
* ``stop()`` is bounded (SIGTERM, wait, SIGKILL) and idempotent; an ``atexit`` handler
  is the backstop, and etcd dies with its parent even when the parent is SIGKILLed;
* ``get_client()`` returns this package's v3 :class:`~etcd_rendezvous.client.EtcdClient`
  (torch: a python-etcd v2 client);
* optional TLS on the client URL (``tls=TLSConfig(...)``) and authentication
  (``root_password=...``), both used by ``get_client()`` and the readiness check.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from etcd_rendezvous.errors import (
    EtcdPortInUseError,
    EtcdRendezvousError,
    EtcdServerError,
    EtcdStartError,
)
from etcd_rendezvous.server._binary import etcd_version, find_etcd_binary
from etcd_rendezvous.server._ports import (
    NoFreePortError,
    describe_listener,
    format_host,
    free_ports,
    http_url,
    looks_like_bind_error,
    port_is_open,
)
from etcd_rendezvous.server._process import (
    DEFAULT_STOP_TIMEOUT,
    ChildExitedError,
    EtcdProcess,
    HealthChecker,
    TLSCheckError,
    register_for_exit,
    terminate_process,
    unregister_for_exit,
    wait_until_ready,
)
from etcd_rendezvous.server._security import TLSConfig, client_kwargs, enable_root_auth
from etcd_rendezvous.server._tempdirs import make_temp_dir

if TYPE_CHECKING:
    from etcd_rendezvous.client import EtcdClient

log = logging.getLogger(__name__)

READY_POLL_INTERVAL = 0.001


def etcd_argv(
    binary: str,
    *,
    name: str,
    data_dir: str,
    host: str,
    client_port: int,
    peer_port: int,
    initial_cluster: str,
    cluster_token: str,
    heartbeat_interval_ms: int,
    election_timeout_ms: int,
    extra_args: Sequence[str] = (),
    tls: TLSConfig | None = None,
) -> list[str]:
    """The etcd command line for one member, as a list (never joined and re-split).

    With ``tls``, the client URL is https (peers stay on http).
    """
    client_url = http_url(host, client_port, "https" if tls is not None else "http")
    peer_url = http_url(host, peer_port)
    return [
        binary,
        "--name", name,
        "--data-dir", data_dir,
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", initial_cluster,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", cluster_token,
        "--heartbeat-interval", str(heartbeat_interval_ms),
        "--election-timeout", str(election_timeout_ms),
        *(tls.etcd_args() if tls is not None else ()),
        *extra_args,
    ]  # fmt: skip


def host_error(host: str, exc: Exception) -> str:
    """Why etcd cannot listen on ``host`` (no free port could be bound there)."""
    cause = exc.__cause__ if isinstance(exc, NoFreePortError) and exc.__cause__ else exc
    return (
        f"cannot listen on host {host!r}: {cause}; etcd runs on this machine, so the host must "
        "be one of its addresses (127.0.0.1 for this machine only)"
    )


def _is_empty_dir(path: str) -> bool:
    try:
        return not os.listdir(path)
    except FileNotFoundError:
        return True


def _start_error(
    what: str, proc: EtcdProcess, stderr_redirected: bool, *, log_kept: bool = True
) -> EtcdStartError:
    """The start error, quoting etcd's log; its path only if the file outlives the error
    (a log in our temporary dir is removed with it when the start fails)."""
    tail = proc.log_tail()
    if tail and log_kept:
        detail = f"; last lines of its log ({proc.log_path}):\n{tail}"
    elif tail:
        detail = f"; last lines of its log:\n{tail}"
    elif stderr_redirected:
        detail = "; its log went to the stderr you passed to start()"
    else:
        detail = "; it wrote nothing"
    return EtcdStartError(f"{what}{detail}", returncode=proc.returncode, log_tail=tail)


class EtcdServer:
    """A local single-member etcd on free loopback ports.

    Usage::

        with EtcdServer() as server:
            client = server.get_client()
            client.put("k", "v")

    or, torch-style, ``server.start()`` ... ``server.stop()``.

    Args:
        data_dir: etcd's data dir. When given it belongs to you: kept by ``stop()`` and
            reused by the next start. Default: a temporary dir removed by ``stop()``.
        binary: the etcd executable (see :func:`find_etcd_binary` for the default).
        host: the address etcd listens on and advertises.
        port: client port; 0 picks a free one.
        peer_port: peer port; 0 picks a free one.
        name: the member name.
        extra_args: more etcd flags, appended last (so they win).
        log_file: where etcd's output goes (appended). Default: a file in a private
            temporary dir, removed by ``stop()``.
        heartbeat_interval_ms, election_timeout_ms: raft timers; the short defaults
            make a single member elect itself in milliseconds.
        stop_timeout: seconds ``stop()`` waits after SIGTERM before SIGKILL.
        tls: serve the client URL over https (see :class:`TLSConfig`); :attr:`url` is
            then ``https://...``, and the readiness check and ``get_client()`` verify
            the server against ``tls.ca_file`` (and present a client certificate when
            ``tls.client_cert_auth``).
        root_password: turn on etcd's authentication: once ready, the first start
            creates the user ``root`` (role ``root``) with this password and enables
            auth; ``get_client()`` then logs in as root. A restart on a data dir where
            auth is already on checks the password.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        binary: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        peer_port: int = 0,
        name: str = "default",
        extra_args: Sequence[str] = (),
        log_file: str | os.PathLike[str] | None = None,
        heartbeat_interval_ms: int = 10,
        election_timeout_ms: int = 50,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        tls: TLSConfig | None = None,
        root_password: str | None = None,
    ) -> None:
        if root_password is not None and not root_password:
            raise ValueError("root_password must not be empty")
        self._binary = find_etcd_binary(binary)
        self._tls = tls
        self._root_password = root_password
        self._host = host
        self._requested_port = port
        self._requested_peer_port = peer_port
        self._port = port
        self._peer_port = peer_port
        self._name = name
        self._extra_args = list(extra_args)
        self._user_data_dir = os.path.abspath(data_dir) if data_dir is not None else None
        self._user_log_file = os.path.abspath(log_file) if log_file is not None else None
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._election_timeout_ms = election_timeout_ms
        self._stop_timeout = stop_timeout
        self._lock = threading.RLock()
        self._proc: EtcdProcess | None = None
        self._workdir: str | None = None  # ours: the default data dir and log live here

    # --- torch's accessors -------------------------------------------------------------

    def get_port(self) -> int:
        """The client port (0 before the first start when it is chosen automatically)."""
        return self._port

    def get_host(self) -> str:
        return self._host

    def get_endpoint(self) -> str:
        """``host:port`` of the client URL."""
        return f"{format_host(self._host)}:{self._port}"

    def get_client(self, **kwargs: Any) -> EtcdClient:
        """A v3 :class:`~etcd_rendezvous.client.EtcdClient` on this server (close it when done).

        It uses this server's TLS files and root credentials (see :meth:`client_kwargs`);
        ``kwargs`` go to the client and win over those.
        """
        from etcd_rendezvous.client import EtcdClient

        return EtcdClient(self.url, **{**self.client_kwargs(), **kwargs})

    def client_kwargs(self) -> dict[str, Any]:
        """What an :class:`~etcd_rendezvous.client.EtcdClient` of this server needs.

        ``ca_cert``/``cert``/``key`` with TLS, ``username``/``password`` (root) with
        auth; empty otherwise. Use with :attr:`url`: ``EtcdClient(server.url, **kw)``.
        """
        return client_kwargs(self._tls, self._root_password)

    # --- properties ----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.get_endpoint()

    @property
    def url(self) -> str:
        """The client URL, ``http://host:port`` (``https://`` with TLS)."""
        return http_url(self._host, self._port, self.scheme)

    @property
    def scheme(self) -> str:
        return "https" if self._tls is not None else "http"

    @property
    def tls(self) -> TLSConfig | None:
        return self._tls

    @property
    def auth_enabled(self) -> bool:
        """True when this server runs with authentication (``root_password``)."""
        return self._root_password is not None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def peer_port(self) -> int:
        return self._peer_port

    @property
    def peer_url(self) -> str:
        return http_url(self._host, self._peer_port)

    @property
    def name(self) -> str:
        return self._name

    @property
    def binary(self) -> str:
        return self._binary

    @property
    def version(self) -> str:
        """The etcd version of :attr:`binary`, e.g. ``"3.5.1"`` (runs ``etcd --version`` once)."""
        return etcd_version(self._binary)

    @property
    def data_dir(self) -> str | None:
        """etcd's data dir (``None`` before the first start when it is a temporary one)."""
        if self._user_data_dir is not None:
            return self._user_data_dir
        if self._workdir is not None:
            return os.path.join(self._workdir, "data")
        return None

    @property
    def log_file(self) -> str | None:
        if self._user_log_file is not None:
            return self._user_log_file
        if self._workdir is not None:
            return os.path.join(self._workdir, "etcd.log")
        return None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def process(self) -> EtcdProcess | None:
        return self._proc

    @property
    def is_running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.is_running

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running else "stopped"
        return f"<EtcdServer {self.get_endpoint()} {state} binary={self._binary!r}>"

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> EtcdServer:
        if not self.is_running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(
        self,
        timeout: float = 60,
        num_retries: int = 3,
        stderr: IO[Any] | int | None = None,
    ) -> None:
        """Start etcd and return once it serves requests.

        Args:
            timeout: seconds for the whole start, retries included.
            num_retries: attempts when a port is taken before etcd binds it.
            stderr: where etcd's stderr (its log) goes instead of the log file
                (torch's argument; the start error then cannot quote the log).

        Raises:
            EtcdStartError: etcd exited (``returncode`` and ``log_tail`` set), a requested
                port is in use, or it was not ready within ``timeout``.
        """
        with self._lock:
            if self.is_running:
                raise EtcdServerError(f"{self!r} is already running")
            self._discard_process()
            deadline = time.monotonic() + timeout
            if self._workdir is None:
                self._workdir = make_temp_dir()  # with an owner marker; stale dirs removed
            try:
                self._start(deadline, max(1, num_retries), stderr)
            except BaseException:
                self._remove_workdir()
                raise
            register_for_exit(self)

    def _start(self, deadline: float, attempts: int, stderr: IO[Any] | int | None) -> None:
        data_dir = self.data_dir
        log_file = self.log_file
        if data_dir is None or log_file is None:  # pragma: no cover - set by start()
            raise EtcdServerError("internal error: no data dir")
        may_wipe_data = _is_empty_dir(data_dir)
        for requested, argument in (
            (self._requested_port, "port"),
            (self._requested_peer_port, "peer_port"),
        ):
            if requested and port_is_open(self._host, requested):
                raise EtcdPortInUseError(
                    f"port {requested} on {self._host} is already in use by "
                    + describe_listener(self._host, requested),
                    host=self._host,
                    port=requested,
                    advice=f"pass {argument}=0 to pick a free one",
                )
        for attempt in range(attempts):
            self._choose_ports(fresh=attempt > 0)
            if attempt > 0 and may_wipe_data:
                shutil.rmtree(data_dir, ignore_errors=True)
            argv = etcd_argv(
                self._binary,
                name=self._name,
                data_dir=data_dir,
                host=self._host,
                client_port=self._port,
                peer_port=self._peer_port,
                initial_cluster=f"{self._name}={self.peer_url}",
                cluster_token=f"etcd-rendezvous-{self._port}",
                heartbeat_interval_ms=self._heartbeat_interval_ms,
                election_timeout_ms=self._election_timeout_ms,
                extra_args=self._extra_args,
                tls=self._tls,
            )
            log.info("starting etcd on %s: %s", self.url, argv)
            started = time.monotonic()
            proc = EtcdProcess.spawn(argv, log_path=log_file, stderr=stderr)
            check = HealthChecker(self._host, self._port, tls=self._tls)
            try:
                wait_until_ready([proc], [check], deadline, interval=READY_POLL_INTERVAL)
            except ChildExitedError:
                tail = proc.log_tail()
                proc.stop()
                bind_failed = looks_like_bind_error(tail) or (stderr is not None and not tail)
                mine = [p for p in (self._requested_port, self._requested_peer_port) if p]
                if bind_failed and any(f":{p}: bind" in tail for p in mine):
                    raise _start_error(
                        f"etcd could not bind a requested port ({', '.join(map(str, mine))} on "
                        f"{self._host}): already in use",
                        proc,
                        stderr is not None,
                        log_kept=self._user_log_file is not None,
                    ) from None
                if bind_failed and attempt + 1 < attempts and time.monotonic() < deadline:
                    log.warning(
                        "etcd could not bind ports %d/%d (taken since we chose them); "
                        "retrying with fresh ports (attempt %d of %d)",
                        self._port,
                        self._peer_port,
                        attempt + 2,
                        attempts,
                    )
                    continue
                raise _start_error(
                    f"etcd ({self._binary}) exited with code {proc.returncode} during start"
                    + (f" after {attempts} attempts" if bind_failed else ""),
                    proc,
                    stderr is not None,
                    log_kept=self._user_log_file is not None,
                ) from None
            except TLSCheckError as exc:
                proc.stop(self._stop_timeout)
                raise _start_error(
                    f"etcd on {self.url} started, but {exc}; check the TLSConfig files",
                    proc,
                    stderr is not None,
                    log_kept=self._user_log_file is not None,
                ) from exc
            except TimeoutError:
                proc.stop(self._stop_timeout)
                raise _start_error(
                    f"etcd on {self.url} was not ready before the start timeout"
                    + (f" (last check: {check.last_error})" if check.last_error else ""),
                    proc,
                    stderr is not None,
                    log_kept=self._user_log_file is not None,
                ) from None
            except BaseException:
                proc.stop(self._stop_timeout)
                raise
            finally:
                check.close()
            if self._root_password is not None:
                try:
                    self._enable_auth(self._root_password, deadline)
                except BaseException:
                    proc.stop(self._stop_timeout)
                    raise
            self._proc = proc
            log.info(
                "etcd ready on %s (pid %d) in %.1f ms",
                self.url,
                proc.pid,
                (time.monotonic() - started) * 1000,
            )
            return

    def _enable_auth(self, password: str, deadline: float) -> None:
        from etcd_rendezvous.client import EtcdClient

        timeout = max(1.0, min(5.0, deadline - time.monotonic()))
        tls = self._tls.client_kwargs() if self._tls is not None else {}
        try:
            with (
                EtcdClient(self.url, timeout=timeout, **tls) as anonymous,
                self.get_client(timeout=timeout) as root,
            ):
                enable_root_auth(anonymous, root, password, self.url)
        except EtcdServerError:
            raise
        except EtcdRendezvousError as exc:
            raise EtcdStartError(f"could not enable authentication on {self.url}: {exc}") from exc

    def _choose_ports(self, *, fresh: bool) -> None:
        """Requested ports always; else the last ones (stable endpoint across restarts)."""
        need_client = not self._requested_port and (fresh or not self._port)
        need_peer = not self._requested_peer_port and (fresh or not self._peer_port)
        try:
            ports = free_ports(int(need_client) + int(need_peer), self._host)
        except (
            OSError,
            NoFreePortError,
        ) as exc:  # not an address of this machine, or a name that won't resolve
            raise EtcdStartError(host_error(self._host, exc)) from exc
        if need_client:
            self._port = ports.pop(0)
        if need_peer:
            self._peer_port = ports.pop(0)

    def restart(self, timeout: float = 60) -> None:
        """Stop etcd (keeping its data dir, even a temporary one) and start it again.

        The endpoint stays the same unless its port was taken meanwhile.
        """
        with self._lock:
            self._stop_process()
            self.start(timeout=timeout)

    def stop(self) -> None:
        """Stop etcd and remove what we created (never a ``data_dir`` you passed). Idempotent."""
        with self._lock:
            try:
                self._stop_process()
            finally:
                self._remove_workdir()
                unregister_for_exit(self)

    def kill(self) -> None:
        """SIGKILL etcd at once, keeping its data (fault injection; then restart() or stop())."""
        with self._lock:
            if self._proc is not None:
                self._proc.kill()

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            log.info("stopping etcd on %s (pid %d)", self.url, proc.pid)
            proc.stop(self._stop_timeout)

    def _discard_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:  # exited on its own (or was killed): reap it
            proc.stop(0)

    def _remove_workdir(self) -> None:
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def stop_etcd(
    process: subprocess.Popen[Any] | EtcdProcess | None,
    data_dir: str | None = None,
    *,
    timeout: float = DEFAULT_STOP_TIMEOUT,
) -> None:
    """Stop an etcd process and optionally remove ``data_dir`` (torch's function).

    Unlike torch's, the wait is bounded: SIGTERM (to the process group when the
    process leads one), ``timeout`` seconds, then SIGKILL.
    """
    if isinstance(process, EtcdProcess):
        process.stop(timeout)
    elif process is not None:
        terminate_process(process, timeout)
    if data_dir:
        log.info("deleting etcd data dir %s", data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)
