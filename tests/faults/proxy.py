"""A real TCP proxy that cuts, stalls or resets traffic between a client and one etcd member.

Put it in front of an etcd endpoint and give the client ``proxy.endpoint`` instead::

    with FaultProxy(server.endpoint) as proxy:
        client = EtcdClient(proxy.endpoint)
        proxy.fault(Fault.DROP_REPLY, path=b"/v3/kv/txn")  # the next txn's reply is lost
        ...

Faults (:class:`Fault`):

* ``PASS``: bytes flow both ways.
* ``DROP_REPLY``: the request is forwarded; as soon as etcd's reply starts (so etcd
  received and answered it), the client's connection is reset and the reply dropped.
* ``RESET``: the client's connection is reset when the request arrives; the request
  never reaches etcd.
* ``STALL`` (:meth:`FaultProxy.stall`): nothing is forwarded either way until
  :meth:`FaultProxy.resume`; then the held bytes go on, including requests whose
  client has given up meanwhile (late duplicates of what the client resent).

:meth:`FaultProxy.fault` arms a fault for the next ``count`` requests whose path
starts with ``path`` (HTTP/1.1 request framing is parsed on the way in; every other
request passes); ``then`` runs in the proxy right after a reply was dropped and
before the client's connection is reset, e.g. to let another client write in
between. Every wait is bounded; a proxy thread that dies unexpectedly is recorded
and :meth:`FaultProxy.close` (the context manager's exit) raises
:class:`ProxyError` with its cause, so a broken proxy cannot pass for a good run.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

log = logging.getLogger(__name__)

_TICK = 0.05  # how often blocked threads look at the proxy's state


class Fault(enum.Enum):
    PASS = "pass"
    DROP_REPLY = "drop_reply"
    RESET = "reset"


class ProxyError(RuntimeError):
    """A proxy thread died unexpectedly, or a bounded wait of the proxy ran out."""


@dataclass
class _Rule:
    fault: Fault
    path: bytes
    count: int
    then: Callable[[], object] | None


@dataclass
class _Conn:
    client: socket.socket
    upstream: socket.socket
    cut_reply: _Rule | None = None  # set: reset instead of forwarding the next reply
    awaiting_reply: bool = False  # a request went to etcd and no reply byte came back yet
    closed: threading.Event = field(default_factory=threading.Event)


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST (SO_LINGER 0) rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A TCP proxy on ``127.0.0.1:<free port>`` to ``target`` (``"host:port"``).

    Thread-safe. Use it as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, target: str, *, host: str = "127.0.0.1") -> None:
        target = target.split("://", 1)[-1].rstrip("/")
        target_host, _, port = target.rpartition(":")
        self.target = (target_host.strip("[]"), int(port))
        self._host = host
        self._listener: socket.socket | None = None
        self._lock = threading.Condition()
        self._rules: list[_Rule] = []
        self._stalled = False
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[_Conn] = []
        self._errors: list[tuple[str, BaseException]] = []
        self.faults_applied = 0
        self.requests_seen = 0
        self.connections = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, 0))
        listener.listen(128)
        listener.settimeout(_TICK)
        self._listener = listener
        self._spawn("accept", self._accept_loop)
        return self

    @property
    def port(self) -> int:
        if self._listener is None:
            raise ProxyError("the proxy is not started")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def endpoint(self) -> str:
        """``host:port`` to give the client instead of the etcd member's."""
        return f"{self._host}:{self.port}"

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, join the threads (bounded).

        Raises :class:`ProxyError` when a thread died unexpectedly or did not stop.
        """
        self._closing.set()
        with self._lock:
            self._stalled = False
            self._lock.notify_all()
            conns = list(self._conns)
        for conn in conns:
            self._close_conn(conn)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        deadline = time.monotonic() + timeout
        alive = []
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                alive.append(thread.name)
        self.check()
        if alive:
            raise ProxyError(f"proxy threads did not stop within {timeout:g}s: {alive}")

    def check(self) -> None:
        """Raise :class:`ProxyError` if a proxy thread died unexpectedly."""
        with self._lock:
            errors = list(self._errors)
        if errors:
            name, exc = errors[0]
            raise ProxyError(
                f"{len(errors)} proxy thread(s) died; first {name}: {type(exc).__name__}: {exc}"
            ) from exc

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults ----------------------------------------------------------------

    def fault(
        self,
        fault: Fault,
        *,
        path: bytes = b"/",
        count: int = 1,
        then: Callable[[], object] | None = None,
    ) -> None:
        """Apply ``fault`` to the next ``count`` requests whose path starts with ``path``."""
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        with self._lock:
            self._rules.append(_Rule(fault, path, count, then))

    def clear(self) -> None:
        """Drop every armed fault (stall is separate: see :meth:`resume`)."""
        with self._lock:
            self._rules.clear()

    def stall(self) -> None:
        """Hold every byte, both ways, until :meth:`resume` (or :meth:`close`)."""
        with self._lock:
            self._stalled = True

    def resume(self) -> None:
        """Forward what was held and let traffic flow again."""
        with self._lock:
            self._stalled = False
            self._lock.notify_all()

    def wait_faults(self, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` faults have been applied in total; ``ProxyError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.faults_applied < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProxyError(
                        f"only {self.faults_applied} of {n} faults applied within {timeout:g}s"
                    )
                self._lock.wait(min(left, _TICK))

    # -- internals -------------------------------------------------------------

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:  # recorded: close()/check() raise it
                if not self._closing.is_set():
                    log.exception("fault proxy thread %s died", name)
                    with self._lock:
                        self._errors.append((name, exc))

        thread = threading.Thread(target=run, name=f"fault-proxy-{name}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                raise
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                _reset(client)  # the member is down: so is the proxy, to the client
                continue
            client.settimeout(_TICK)
            upstream.settimeout(_TICK)
            conn = _Conn(client, upstream)
            with self._lock:
                self._conns.append(conn)
                self.connections += 1
            self._spawn("up", self._client_to_upstream, conn)
            self._spawn("down", self._upstream_to_client, conn)

    def _close_conn(self, conn: _Conn, *, reset: bool = False) -> None:
        if conn.closed.is_set():
            return
        conn.closed.set()
        if reset:
            _reset(conn.client)
        else:
            with contextlib.suppress(OSError):
                conn.client.close()
        with contextlib.suppress(OSError):
            conn.upstream.close()
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)

    def _wait_unstalled(self) -> None:
        with self._lock:
            while self._stalled and not self._closing.is_set():
                self._lock.wait(_TICK)

    def _recv(self, conn: _Conn, sock: socket.socket) -> bytes | None:
        """The next bytes from ``sock``; None when it or the proxy closed."""
        while not conn.closed.is_set() and not self._closing.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return None
            return data or None
        return None

    def _send(self, sock: socket.socket, data: bytes) -> bool:
        try:
            sock.sendall(data)
        except OSError:
            return False
        return True

    def _match(self, path: bytes) -> _Rule | None:
        with self._lock:
            self.requests_seen += 1
            for rule in self._rules:
                if path.startswith(rule.path):
                    rule.count -= 1
                    if rule.count <= 0:
                        self._rules.remove(rule)
                    return rule
        return None

    def _applied(self) -> None:
        with self._lock:
            self.faults_applied += 1
            self._lock.notify_all()

    def _client_to_upstream(self, conn: _Conn) -> None:
        buf = b""
        while True:
            # One HTTP/1.1 request: headers, then Content-Length bytes of body.
            while b"\r\n\r\n" not in buf:
                data = self._recv(conn, conn.client)
                if data is None:
                    self._finish_upstream(conn, buf)
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(rest) < length:
                data = self._recv(conn, conn.client)
                if data is None:
                    self._finish_upstream(conn, head + b"\r\n\r\n" + rest)
                    return
                rest += data
            request = head + b"\r\n\r\n" + rest[:length]
            buf = rest[length:]
            parts = head.split(b" ", 2)
            rule = self._match(parts[1] if len(parts) > 1 else b"")
            if rule is not None and rule.fault is Fault.RESET:
                self._applied()
                self._close_conn(conn, reset=True)
                return
            if rule is not None and rule.fault is Fault.DROP_REPLY:
                conn.cut_reply = rule
            self._wait_unstalled()
            conn.awaiting_reply = True
            if not self._send(conn.upstream, request):
                self._close_conn(conn)
                return

    def _finish_upstream(self, conn: _Conn, pending: bytes, wait: float = 5.0) -> None:
        """The client went away. Forward what it had sent (held by a stall, say) and keep
        the connection to etcd open until etcd answers (up to ``wait`` s), so the request
        is processed as a late duplicate would be, not cancelled."""
        if pending:
            self._wait_unstalled()
            if self._send(conn.upstream, pending):
                conn.awaiting_reply = True
        deadline = time.monotonic() + wait
        while conn.awaiting_reply and not conn.closed.is_set() and time.monotonic() < deadline:
            time.sleep(_TICK / 5)
        self._close_conn(conn)

    def _upstream_to_client(self, conn: _Conn) -> None:
        while True:
            data = self._recv(conn, conn.upstream)
            if data is None:
                self._close_conn(conn)
                return
            conn.awaiting_reply = False
            rule = conn.cut_reply
            if rule is not None:
                # etcd answered: the request was received and processed. Drop the reply.
                if rule.then is not None:
                    rule.then()
                self._close_conn(conn, reset=True)
                self._applied()
                return
            self._wait_unstalled()
            if not self._send(conn.client, data):
                self._close_conn(conn)
                return


__all__ = ["Fault", "FaultProxy", "ProxyError"]
