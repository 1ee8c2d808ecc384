"""One etcd child process: spawn, readiness, signals, stop, and the exit backstop.

Guarantees:

* the child runs in its own session (process group), so stopping it also stops
  anything it started, and a Ctrl-C in the parent's terminal is not delivered twice;
* on Linux the child gets ``PR_SET_PDEATHSIG(SIGKILL)`` (through ``setpriv``, or
  ``prctl`` in a ``preexec_fn``; see below): if the parent dies, even by SIGKILL, the
  kernel kills etcd. The signal fires when the *thread* that forked exits, so every
  spawn runs on one long-lived daemon thread (:class:`_Spawner`), never on a user
  thread that may end while etcd is meant to keep running. Elsewhere (macOS) the
  ``atexit`` backstop is all there is;
* stopping is SIGTERM to the group, a bounded wait, then SIGKILL;
* every running process (and every started server) is registered, and one
  ``atexit`` handler stops whatever is still running when the interpreter exits.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol, TypeVar

import urllib3

from etcd_rendezvous.client._diagnose import summarize_reply
from etcd_rendezvous.errors import EtcdServerError
from etcd_rendezvous.server._security import TLSConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_STOP_TIMEOUT = 10.0
"""Seconds to wait after SIGTERM before SIGKILL."""

_PR_SET_PDEATHSIG = 1


# --- parent-death signal ------------------------------------------------------------
#
# Two ways to give the child PR_SET_PDEATHSIG(SIGKILL), both followed by a getppid()
# check that closes the race with a parent dying before the signal was armed:
#
# * preferred: exec through util-linux ``setpriv --pdeathsig KILL`` and ``/bin/sh``
#   (``[ "$PPID" = <parent> ] && exec etcd ...``). Popen then needs no preexec_fn, so
#   CPython spawns with vfork: with torch imported, a full fork() costs ~18 ms, this ~2 ms;
# * fallback: ``prctl`` through ctypes in a ``preexec_fn`` (a full fork).

# "$0" is the parent pid, "$@" etcd's argv: passed as arguments, never re-split.
_PPID_CHECK = '[ "$PPID" = "$0" ] || exit 125; exec "$@"'


@functools.cache
def _setpriv_path() -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    path = shutil.which("setpriv")
    if path is None or not os.path.exists("/bin/sh"):
        return None
    try:
        result = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if "--pdeathsig" in result.stdout else None


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        log.warning("prctl() unavailable: etcd will not die with its parent", exc_info=True)
        return None
    return prctl


@functools.cache
def _get_prctl() -> Callable[..., int] | None:
    # Loaded in the parent: nothing may be dlopen()ed between fork and exec.
    return _load_prctl()


def _make_child_setup(parent_pid: int) -> Callable[[], None] | None:
    prctl = _get_prctl()
    if prctl is None:
        return None
    sigkill = int(signal.SIGKILL)

    def child_setup() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the line above took effect
            os._exit(125)

    return child_setup


def _tie_to_parent(argv: list[str], parent_pid: int) -> tuple[list[str], Callable[[], None] | None]:
    """(argv to exec, preexec_fn) so that the child dies with this process."""
    setpriv = _setpriv_path()
    if setpriv is not None:
        launcher = [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", _PPID_CHECK]
        return [*launcher, str(parent_pid), *argv], None
    return argv, _make_child_setup(parent_pid)


# --- the spawner thread ---------------------------------------------------------------


class _Spawner:
    """A process-wide daemon thread that performs every fork.

    PR_SET_PDEATHSIG is tied to the forking thread; this thread lives as long as the
    process, so a child dies with the process and not with whichever thread asked.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._queue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = -1

    def _ensure_thread(self) -> threading.Thread:
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                # New process (after fork) or first use: a fresh queue and thread.
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._run, args=(self._queue,), name="etcd-spawner", daemon=True
                )
                self._thread.start()
                self._pid = os.getpid()
            return self._thread

    @staticmethod
    def _run(
        jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]],
    ) -> None:
        while True:
            fn, future = jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        thread = self._ensure_thread()
        if threading.current_thread() is thread:
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((fn, future))
        return future.result()


_spawner = _Spawner()


# --- the exit backstop ------------------------------------------------------------------


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_registry_lock = threading.Lock()
_running: dict[int, _Stoppable] = {}
_spawned: list[EtcdProcess] = []


@functools.cache
def install_exit_handler() -> None:
    """Install the exit backstop now (exit handlers registered after it run before it)."""
    atexit.register(_stop_all_at_exit)


def register_for_exit(obj: _Stoppable) -> None:
    """Stop ``obj`` at interpreter exit unless it was stopped (and unregistered) before."""
    install_exit_handler()
    with _registry_lock:
        _running[id(obj)] = obj


def unregister_for_exit(obj: _Stoppable) -> None:
    with _registry_lock:
        _running.pop(id(obj), None)


def _stop_all_at_exit() -> None:
    while True:
        with _registry_lock:
            if not _running:
                return
            _, obj = _running.popitem()  # LIFO: servers before their processes
        try:
            log.info("stopping %r at interpreter exit", obj)
            obj.stop()
        except Exception:
            log.exception("failed to stop %r at interpreter exit", obj)


def live_processes() -> list[EtcdProcess]:
    """Processes spawned by this interpreter that are still running (for test-suite checks)."""
    with _registry_lock:
        spawned = list(_spawned)
    return [p for p in spawned if p.poll() is None]


# --- one child ---------------------------------------------------------------------------


def _signal_group(popen: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig`` to the child's process group if it leads one, else to the child."""
    if popen.returncode is not None:
        return
    try:
        pgid = os.getpgid(popen.pid)
    except ProcessLookupError:
        return
    try:
        if pgid == popen.pid and pgid != os.getpgrp():
            os.killpg(pgid, sig)
        else:
            os.kill(popen.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:  # a zombie group on some kernels: fall back to the leader
        if exc.errno != errno.EPERM:
            raise
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, sig)


def terminate_process(popen: subprocess.Popen[Any], timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
    """SIGTERM the child's group, wait up to ``timeout`` s, then SIGKILL it. Idempotent."""
    if popen.poll() is not None:
        return
    log.debug("sending SIGTERM to etcd pid %d", popen.pid)
    _signal_group(popen, signal.SIGTERM)
    _signal_group(popen, signal.SIGCONT)  # a paused (SIGSTOPped) child must run to exit
    try:
        popen.wait(timeout=max(0.0, timeout))
        return
    except subprocess.TimeoutExpired:
        log.warning(
            "etcd pid %d did not exit %.1f s after SIGTERM; sending SIGKILL", popen.pid, timeout
        )
    kill_process(popen)


def kill_process(popen: subprocess.Popen[Any]) -> None:
    """SIGKILL the child's group and reap it."""
    _signal_group(popen, signal.SIGKILL)
    try:
        popen.wait(timeout=30)
    except subprocess.TimeoutExpired as exc:  # unkillable (D state): say so, never hang
        raise EtcdServerError(f"etcd pid {popen.pid} survived SIGKILL for 30 s") from exc


class EtcdProcess:
    """A running etcd (or any) child process with its log file.

    Use :meth:`spawn`; the constructor only wraps an existing ``Popen``.
    """

    def __init__(self, popen: subprocess.Popen[Any], argv: Sequence[str], log_path: str | None):
        self.popen = popen
        self.argv = list(argv)
        self.log_path = log_path

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        log_path: str | None = None,
        stderr: IO[Any] | int | None = None,
        env: dict[str, str] | None = None,
    ) -> EtcdProcess:
        """Start ``argv`` in a new session, tied to this process's life.

        Output goes to ``log_path`` (appended), unless ``stderr`` is given (torch's
        ``start(stderr=...)``), in which case stderr goes there and stdout to the log.
        """
        argv = [os.fspath(a) for a in argv]
        parent_pid = os.getpid()

        exec_argv, child_setup = _tie_to_parent(argv, parent_pid)

        def do_spawn() -> subprocess.Popen[bytes]:
            log_file = open(log_path, "ab") if log_path else None  # noqa: SIM115
            try:
                out: IO[Any] | int = log_file if log_file is not None else subprocess.DEVNULL
                return subprocess.Popen(
                    exec_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=stderr if stderr is not None else out,
                    close_fds=True,
                    start_new_session=True,
                    preexec_fn=child_setup,  # noqa: PLW1509
                    env=env,
                )
            finally:
                if log_file is not None:
                    log_file.close()

        try:
            popen = _spawner.call(do_spawn)
        except OSError as exc:
            raise EtcdServerError(f"could not run {argv[0]!r}: {exc}") from exc
        proc = cls(popen, argv, log_path)
        with _registry_lock:
            _spawned[:] = [p for p in _spawned if p.popen.returncode is None]
            _spawned.append(proc)
        register_for_exit(proc)
        log.debug("started pid %d: %s", popen.pid, argv)
        return proc

    def __repr__(self) -> str:
        state = "running" if self.popen.returncode is None else f"exited {self.popen.returncode}"
        return f"<EtcdProcess pid={self.popen.pid} {state}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def poll(self) -> int | None:
        return self.popen.poll()

    @property
    def is_running(self) -> bool:
        return self.popen.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the child's process group (no-op once it exited)."""
        if self.popen.poll() is None:
            _signal_group(self.popen, sig)

    def pause(self) -> None:
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """SIGTERM, bounded wait, SIGKILL. Idempotent."""
        try:
            terminate_process(self.popen, timeout)
        finally:
            if self.popen.returncode is not None:
                unregister_for_exit(self)

    def kill(self) -> None:
        """SIGKILL at once (fault injection). Idempotent."""
        try:
            kill_process(self.popen)
        finally:
            if self.popen.returncode is not None:
                unregister_for_exit(self)

    def log_tail(self, lines: int = 20, max_bytes: int = 16384) -> str:
        """The last ``lines`` lines of the child's log ('' when there is none)."""
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                data = f.read()
        except OSError:
            return ""
        text = data.decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


# --- readiness ----------------------------------------------------------------------------


class TLSCheckError(EtcdServerError):
    """The readiness check cannot talk TLS to etcd (a certificate problem, not a delay)."""


class HealthChecker:
    """GET /health on one member: true once it serves requests with a leader.

    With ``tls``, over https: the server is verified against ``tls.ca_file`` and the
    client certificate presented when etcd asks for one. Repeated TLS handshake
    failures raise :class:`TLSCheckError` at once rather than wait for the deadline.
    """

    MAX_TLS_FAILURES = 3

    def __init__(
        self,
        host: str,
        port: int,
        *,
        request_timeout: float = 1.0,
        tls: TLSConfig | None = None,
    ) -> None:
        timeout = urllib3.Timeout(connect=request_timeout, read=request_timeout)
        self._pool: urllib3.HTTPConnectionPool
        if tls is None:
            self._pool = urllib3.HTTPConnectionPool(
                host.strip("[]"), port, maxsize=1, retries=False, timeout=timeout
            )
        else:
            self._pool = urllib3.HTTPSConnectionPool(
                host.strip("[]"),
                port,
                maxsize=1,
                retries=False,
                timeout=timeout,
                **tls.pool_kwargs(),
            )

        self.last_error: str | None = None
        """Why the last check failed (for start errors), ``None`` after a success."""
        self._tls_failures = 0

    def __call__(self) -> bool:
        try:
            response = self._pool.request("GET", "/health", retries=False)
        except urllib3.exceptions.SSLError as exc:
            # A TLS mismatch (untrusted certificate, no client certificate) never heals.
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._tls_failures += 1
            if self._tls_failures >= self.MAX_TLS_FAILURES:
                raise TLSCheckError(
                    f"the TLS handshake with etcd on {self._pool.host}:{self._pool.port} "
                    f"failed {self._tls_failures} times: {exc}"
                ) from exc
            return False
        except urllib3.exceptions.HTTPError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        self._tls_failures = 0
        try:
            body = json.loads(response.data)
        except ValueError:
            body = None
        if (
            response.status == 200
            and isinstance(body, dict)
            and body.get("health") in ("true", True)
        ):
            self.last_error = None
            return True
        reply = summarize_reply(response.data, response.headers.get("Content-Type", ""))
        self.last_error = f"HTTP {response.status}, {reply}"
        return False

    def close(self) -> None:
        self._pool.close()


class ChildExitedError(EtcdServerError):
    """Internal: a child exited while we waited for readiness."""

    def __init__(self, proc: EtcdProcess) -> None:
        super().__init__(f"etcd pid {proc.pid} exited with code {proc.returncode}")
        self.proc = proc


def wait_until_ready(
    processes: Sequence[EtcdProcess],
    checks: Sequence[Callable[[], bool]],
    deadline: float,
    *,
    interval: float = 0.001,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Poll until every check passes; notice a child that died first.

    Raises:
        ChildExitedError: a process exited.
        TimeoutError: ``deadline`` (a ``clock()`` value) passed.
    """
    pending = list(checks)
    while True:
        for proc in processes:
            if proc.poll() is not None:
                raise ChildExitedError(proc)
        pending = [check for check in pending if not check()]
        if not pending:
            return
        if clock() >= deadline:
            raise TimeoutError
        sleep(interval)
