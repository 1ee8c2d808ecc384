"""Requests waiting for a reply, and the monitor that gives up on the hopeless ones.

A request sent to a member that then hangs (SIGSTOP, a stalled network: the TCP
connection stays open) or whose leader dies (a follower keeps a write it forwarded
to the dead leader until etcd's own request timeout, about 7 s) would otherwise wait
for the client's whole timeout. With several endpoints, the transport registers every
unary request while it waits for the reply (:class:`InFlight`), and one monitor thread
per transport looks at those waiting longer than ``suspect_after``: it sends their
member a status request and cuts the connection (``shutdown``) of the request when

* the member does not answer within ``probe_timeout`` (hung or dead), or
* it answers that it has no leader, or
* its raft term moved on since the request was sent (the leader changed: a write the
  old leader never committed will never be answered), and the reply still has not
  come ``grace`` seconds later (a write that survived the change is answered then).

The member is then reported (``on_member_failed(endpoint, reason, hung)``): the
transport moves its requests to the next endpoint, and the client moves the watch
streams of a member that hangs (a leaderless member ends them itself). A cut read is
then retried on the next endpoint at once; a cut write raises ``EtcdTimeoutError``
saying that its outcome is unknown (it may have been applied), at about the election
time rather than after the client's timeout. A slow but healthy member (same leader,
same term) is left alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

Probe = Callable[[Any, float], "dict[str, Any] | str | None"]
"""``probe(endpoint, timeout)``: the member's status reply, why there is none (a str),
or ``None`` when it answered something else (alive, nothing more known)."""


class _Socket(Protocol):
    def shutdown(self, how: int, /) -> None: ...


@dataclass
class _Request:
    endpoint: Any
    sock: _Socket
    thread: int
    started: float
    term: int  # the member's raft term when it was sent (0: unknown yet)
    changed_at: float | None = None
    reason: str | None = field(default=None)
    finished: bool = False


class InFlight:
    """The registry of waiting requests and its monitor thread (see the module doc)."""

    def __init__(
        self,
        probe: Probe,
        on_member_failed: Callable[[Any, str, bool], None],
        *,
        suspect_after: float = 0.3,
        probe_timeout: float = 1.0,
        grace: float = 0.1,
        interval: float = 0.05,
    ) -> None:
        self._probe = probe
        self._on_member_failed = on_member_failed
        self.suspect_after = suspect_after
        self.probe_timeout = probe_timeout
        self.grace = grace
        self.interval = interval
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._terms: dict[Any, int] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    # -- the requesting thread ----------------------------------------------------

    @contextlib.contextmanager
    def sending(self, endpoint: Any) -> Any:
        """Mark the calling thread's next reply wait as one on ``endpoint`` (see ``waiting``)."""
        self._local.endpoint = endpoint
        self._local.reason = None
        try:
            yield
        finally:
            self._local.endpoint = None

    def waiting(self, sock: _Socket | None) -> int | None:
        """Register the calling thread's wait for a reply on ``sock``; a token for ``done``."""
        endpoint = getattr(self._local, "endpoint", None)
        if endpoint is None or sock is None or self._closed.is_set():
            return None
        token = next(self._ids)
        request = _Request(
            endpoint,
            sock,
            threading.get_ident(),
            time.monotonic(),
            self._terms.get(endpoint, 0),
        )
        with self._lock:
            self._requests[token] = request
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="etcd-request-monitor", daemon=True
                )
                self._thread.start()
        return token

    def done(self, token: int | None) -> None:
        if token is None:
            return
        with self._lock:
            request = self._requests.pop(token, None)
            if request is not None:
                request.finished = True
        if request is not None and request.reason is not None:
            self._local.reason = request.reason

    def cut_reason(self) -> str | None:
        """Why the monitor cut the calling thread's last request (``None``: it did not)."""
        reason: str | None = getattr(self._local, "reason", None)
        self._local.reason = None
        return reason

    def saw_term(self, endpoint: Any, term: int) -> None:
        """A reply from ``endpoint`` carried raft term ``term``."""
        if term > self._terms.get(endpoint, 0):
            self._terms[endpoint] = term

    def close(self) -> None:
        self._closed.set()

    # -- the monitor thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed.wait(self.interval):
                self._check()
        except Exception:
            # Not fatal to anyone: requests then wait for their own timeout, as before.
            log.exception("the etcd request monitor crashed; requests fall back to timeouts")
            with self._lock:
                self._thread = None

    def _check(self) -> None:
        now = time.monotonic()
        with self._lock:
            suspects = [
                r
                for r in self._requests.values()
                if r.reason is None and now - r.started >= self.suspect_after
            ]
        by_endpoint: dict[Any, list[_Request]] = {}
        for request in suspects:
            by_endpoint.setdefault(request.endpoint, []).append(request)
        for endpoint, requests in by_endpoint.items():
            reply = self._probe(endpoint, self.probe_timeout)
            if reply is None:
                continue
            if isinstance(reply, str):
                reason = f"{endpoint} did not answer a status request: {reply}"
                self._cut(requests, reason)
                self._on_member_failed(endpoint, reason, True)
                continue
            leader = _int(reply.get("leader"))
            term = _int(reply.get("raftTerm"))
            self.saw_term(endpoint, term)
            if not leader:
                reason = f"{endpoint} has no leader"
                self._cut(requests, reason)
                self._on_member_failed(endpoint, reason, False)
                continue
            now = time.monotonic()
            late = []
            for request in requests:
                if not request.term:
                    request.term = term  # the baseline, for the next look
                elif term > request.term:
                    if request.changed_at is None:
                        request.changed_at = now
                    if now - request.changed_at >= self.grace:
                        late.append(request)
            if late:
                self._cut(late, f"the etcd leader changed while {endpoint} held the request")

    def _cut(self, requests: list[_Request], reason: str) -> None:
        for request in requests:
            with self._lock:
                if request.finished or request.reason is not None:
                    continue
                request.reason = reason
            log.info("giving up on a request to etcd: %s", reason)
            with contextlib.suppress(OSError):
                request.sock.shutdown(socket.SHUT_RDWR)


def _int(value: object) -> int:
    try:
        return int(str(value or 0))
    except ValueError:
        return 0
