"""Watches that resume after a lost connection and never die silently.

A :class:`Watch` owns one streaming ``POST /v3/watch`` and a reader thread that
turns its newline-delimited JSON messages into :class:`WatchEvent` objects on a
queue. When the stream breaks (member killed, server restarted, leader lost),
the reader opens a new one (on the same or another endpoint, with a bounded
:class:`~etcd_rendezvous.client._retry.Retry`) starting at the revision after
the last one it delivered, so no event is lost or repeated. When that revision
was compacted, :class:`~etcd_rendezvous.errors.EtcdCompactedError` is raised;
when the retry gives up, :class:`~etcd_rendezvous.errors.EtcdWatchError`. Both
come out of :meth:`Watch.next_event` and iteration, not a log line.

A member that hangs (SIGSTOP, a network stall that keeps the TCP connection open)
never closes the stream, so a :class:`WatchMonitor` (one thread per client) looks
for streams silent for ``idle_check`` seconds and sends their endpoint a cheap
status request with a short timeout; when it gets no answer, it aborts the stream
and the watch resumes on another endpoint, as for a dropped connection.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import urllib3
from urllib3.exceptions import HTTPError

from etcd_rendezvous.client._codec import Codec, empty_reply_message, header_revision, to_int
from etcd_rendezvous.client._endpoints import Endpoint
from etcd_rendezvous.client._retry import Retry
from etcd_rendezvous.client._transport import (
    _TOKEN_ERRORS,
    Transport,
    close_stream,
    release_stream,
    translate_error,
)
from etcd_rendezvous.client._types import WatchEvent
from etcd_rendezvous.errors import (
    EtcdAuthError,
    EtcdClientError,
    EtcdCompactedError,
    EtcdTimeoutError,
    EtcdUnavailableError,
    EtcdWatchError,
)

log = logging.getLogger(__name__)

_END = object()  # queued when the watch was cancelled
_READ_SIZE = 65536


class _Resume(Exception):
    """The stream ended in a way that a new stream can fix."""


class WatchMonitor:
    """Aborts the streams of watches whose member stopped answering.

    One daemon thread, started with the first watch and ended when the last one is
    gone (or on :meth:`close`). Every ``idle_check / 2`` seconds it looks for streams
    silent for at least ``idle_check`` seconds, probes each of their endpoints once
    (``probe_timeout``), and aborts the streams on an endpoint that did not answer.
    """

    def __init__(
        self,
        transport: Transport,
        idle_check: float,
        *,
        probe_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_check <= 0:
            raise ValueError(f"idle_check must be positive, got {idle_check}")
        self.idle_check = idle_check
        self.probe_timeout = (
            probe_timeout
            if probe_timeout is not None
            else min(transport.timeout, max(0.5, idle_check / 2))
        )
        self._transport = transport
        self._clock = clock
        self._cond = threading.Condition()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    def register(self, watch: Watch) -> None:
        with self._cond:
            if self._closed:
                return
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="etcd-watch-monitor", daemon=True
                )
                self._thread.start()

    def unregister(self, watch: Watch) -> None:
        with self._cond:
            self._watches.discard(watch)
            if not self._watches:
                self._cond.notify_all()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def close(self) -> None:
        """Stop the thread (bounded wait); idempotent."""
        with self._cond:
            self._closed = True
            self._watches.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.probe_timeout + 1.0)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._closed and self._watches:
                        self._cond.wait(self.idle_check / 2)
                    if self._closed or not self._watches:
                        self._thread = None
                        return
                    watches = list(self._watches)
                self.check(watches)
        except Exception:  # a bug: say so, never die silently
            log.exception("the etcd watch monitor crashed; hung members go unnoticed")
            with self._cond:
                self._thread = None

    def check(self, watches: list[Watch]) -> None:
        """One round: probe the endpoints of silent streams, abort those that hang."""
        now = self._clock()
        silent: dict[Endpoint, list[tuple[Watch, urllib3.BaseHTTPResponse]]] = {}
        for watch in watches:
            state = watch._stream_state()
            if state is None:
                continue
            ep, resp, last = state
            if now - last >= self.idle_check:
                silent.setdefault(ep, []).append((watch, resp))
        for ep, streams in silent.items():
            if self._closed:
                return
            reason = self._transport.probe(ep, self.probe_timeout)
            if reason is None:
                for watch, resp in streams:
                    watch._touch(resp, self._clock())
                continue
            log.warning(
                "etcd %s did not answer (%s) while %d watch stream(s) on it were silent for "
                "%.1fs; moving them to another endpoint",
                ep,
                reason,
                len(streams),
                self.idle_check,
            )
            for watch, resp in streams:
                watch._abort_stream(resp, f"{ep} hangs: {reason}")


class Watch:
    """A running watch; create it with :meth:`EtcdClient.watch`.

    Iterate over it, or call :meth:`next_event` with a timeout. :attr:`revision`
    is the last revision the watch has seen (every event up to it has been
    queued). Use it as a context manager, or call :meth:`cancel`.
    """

    def __init__(
        self,
        transport: Transport,
        codec: Codec,
        key: bytes,
        range_end: str | None,
        *,
        start_revision: int | None,
        prev_kv: bool,
        retry: Retry,
        on_close: Callable[[Watch], None] | None = None,
        monitor: WatchMonitor | None = None,
    ) -> None:
        self.key = key
        self._transport = transport
        self._codec = codec
        self._range_end = range_end
        self._prev_kv = prev_kv
        self._retry = retry
        self._on_close = on_close
        self._monitor = monitor
        self._last_activity = 0.0
        self._abort_reason: str | None = None
        # The revision the next stream starts from; 0 = "from now" (first stream only).
        self._next_rev = start_revision or 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._resp: urllib3.BaseHTTPResponse | None = None
        self._endpoint: Endpoint | None = None
        self._cancelled = threading.Event()
        self._created = threading.Event()
        self._start_error: BaseException | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"etcd-watch {key[:40]!r}", daemon=True
        )

    # -- public --------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The last revision this watch has seen (0 before etcd confirmed it)."""
        return max(self._next_rev - 1, 0)

    @property
    def endpoint(self) -> str | None:
        """The endpoint the stream is connected to."""
        return None if self._endpoint is None else self._endpoint.url

    @property
    def error(self) -> BaseException | None:
        """Why the watch ended, once the reader stopped for an error."""
        return self._error

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def next_event(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event, or ``None`` after ``timeout`` seconds or once cancelled.

        Raises EtcdCompactedError/EtcdWatchError when the watch cannot go on
        (again on every later call).
        """
        try:
            item = self._queue.get(timeout=timeout) if timeout != 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, WatchEvent):
            return item
        if item is _END:
            self._queue.put(_END)
            return None
        # An exception: keep it at the front for the next call too.
        self._queue.put(item)
        raise item

    def __iter__(self) -> Iterator[WatchEvent]:
        while True:
            event = self.next_event(None)
            if event is None:
                return
            yield event

    def cancel(self) -> None:
        """Stop the watch and close its stream (promptly); idempotent."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        with self._lock:
            resp = self._resp
        if resp is not None:
            close_stream(resp)
        if self._monitor is not None:
            self._monitor.unregister(self)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # The reader may be opening a stream: bounded by connect + reply timeouts.
            transport = self._transport
            self._thread.join(timeout=transport.connect_timeout + transport.timeout + 1.0)
            if self._thread.is_alive():
                log.warning("watch reader on %r did not stop in time", self.key)
        self._queue.put(_END)
        if self._on_close is not None:
            self._on_close(self)

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else ("failed" if self._error else "running")
        return f"<Watch {self.key!r} revision={self.revision} {state} on {self.endpoint}>"

    # -- start ---------------------------------------------------------------

    def start(self) -> None:
        """Open the stream; return once etcd confirmed the watch (or raise)."""
        if self._monitor is not None:
            self._monitor.register(self)
        self._thread.start()
        # Bounded: one connect + reply per endpoint, at worst (plus a monitor round).
        limit = self._transport.timeout * len(self._transport.endpoints) + 1.0
        if self._monitor is not None:
            limit += self._monitor.idle_check * 1.5 + self._monitor.probe_timeout
        if not self._created.wait(limit):
            self.cancel()
            raise EtcdTimeoutError(
                f"etcd did not confirm the watch on {self.key!r} within {limit:g}s",
                endpoint=self.endpoint,
                key=self.key,
            )
        if self._start_error is not None:
            self.cancel()
            raise self._start_error

    # -- reader thread -------------------------------------------------------

    def _request(self) -> dict[str, Any]:
        req: dict[str, Any] = {"key": self._codec.key(self.key)}
        if self._range_end is not None:
            req["range_end"] = self._range_end
        if self._next_rev:
            req["start_revision"] = str(self._next_rev)
        if self._prev_kv:
            req["prev_kv"] = True
        return {"create_request": req}

    # -- monitor hooks (called from the monitor thread) ----------------------

    def _stream_state(self) -> tuple[Endpoint, urllib3.BaseHTTPResponse, float] | None:
        with self._lock:
            if self._resp is None or self._endpoint is None:
                return None
            return self._endpoint, self._resp, self._last_activity

    def _touch(self, resp: urllib3.BaseHTTPResponse, now: float) -> None:
        with self._lock:
            if self._resp is resp:
                self._last_activity = max(self._last_activity, now)

    def _abort_stream(self, resp: urllib3.BaseHTTPResponse, reason: str) -> None:
        with self._lock:
            if self._resp is not resp:
                return
            self._abort_reason = reason
        close_stream(resp)

    # -- reader thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:
            if self._cancelled.is_set():
                return
            if not self._created.is_set():
                self._start_error = exc
                self._created.set()
                return
            self._error = exc
            log.warning("watch on %r stopped: %s", self.key, exc)
            self._queue.put(exc)
        finally:
            if self._monitor is not None:
                self._monitor.unregister(self)

    def _loop(self) -> None:
        retry = self._retry
        endpoints = self._transport.rotation()
        i = 0
        failed: list[str] = []
        last_error: BaseException | None = None
        while not self._cancelled.is_set():
            current = self._transport.endpoints
            if set(current) != set(endpoints):  # the client learned other members
                endpoints, i = self._transport.rotation(), 0
            ep = endpoints[i % len(endpoints)]
            try:
                self._stream(ep)
                return  # cancelled while streaming
            except _Resume as exc:
                last_error = exc.__cause__ or exc
                if self._stream_was_up:
                    failed.clear()
                    log.info(
                        "watch on %r lost its stream to %s (%s); resuming from revision %d",
                        self.key,
                        ep,
                        last_error,
                        self._next_rev,
                    )
                failed.append(f"{ep}: {last_error}")
            i += 1
            if len(failed) < len(endpoints):
                continue  # try the next endpoint at once
            if not self._created.is_set():
                raise EtcdUnavailableError(
                    f"cannot watch {self.key!r}: no etcd endpoint reachable ("
                    + "; ".join(failed)
                    + ")",
                    endpoint=str(ep),
                    key=self.key,
                ) from last_error
            if not retry.sleep(self._cancelled):
                if self._cancelled.is_set():
                    return
                raise EtcdWatchError(
                    f"watch on {self.key!r} could not resume from revision {self._next_rev} "
                    f"after {retry.attempts} attempts in {retry.deadline:g}s: " + "; ".join(failed),
                    endpoint=str(ep),
                    key=self.key,
                ) from last_error
            failed.clear()

    _stream_was_up = False

    def _stream(self, ep: Endpoint) -> None:
        """Run one stream to ``ep``; raise _Resume when a new stream should follow."""
        self._stream_was_up = False
        try:
            resp = self._transport.open_stream("/v3/watch", self._request(), ep)
        except EtcdAuthError as exc:
            if not any(t in str(exc) for t in _TOKEN_ERRORS) or not self._transport.has_auth:
                raise
            self._transport.authenticate(stale=self._transport.headers().get("Authorization"))
            raise _Resume("auth token refreshed") from exc
        except (EtcdUnavailableError, EtcdTimeoutError) as exc:
            if self._transport.has_auth and empty_reply_message(exc) is not None:
                # Maybe an invalid token (etcd issues 15256, 20332): resume with a new one.
                try:
                    self._transport.authenticate(
                        stale=self._transport.headers().get("Authorization")
                    )
                except EtcdClientError as auth_exc:  # etcd unreachable: the retry decides
                    log.debug(
                        "watch on %r: fetching a new auth token failed: %s", self.key, auth_exc
                    )
            raise _Resume(str(exc)) from exc
        with self._lock:
            self._resp = resp
            self._endpoint = ep
            self._abort_reason = None
            self._last_activity = time.monotonic()
        try:
            if self._cancelled.is_set():
                return
            self._read(resp, ep)
        except (HTTPError, OSError) as exc:
            if self._cancelled.is_set():
                return
            if self._abort_reason is not None:
                raise _Resume(self._abort_reason) from exc
            raise _Resume(f"stream broken: {exc}") from exc
        finally:
            with self._lock:
                self._resp = None
            release_stream(resp)

    def _read(self, resp: urllib3.BaseHTTPResponse, ep: Endpoint) -> None:
        buf = b""
        loads = _loads
        while True:
            chunk = resp.read1(_READ_SIZE, decode_content=False)
            if not chunk:
                if self._cancelled.is_set():
                    return
                if self._abort_reason is not None:
                    raise _Resume(self._abort_reason)
                raise _Resume("stream closed by etcd")
            self._last_activity = time.monotonic()
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    break
                line, buf = buf[:nl], buf[nl + 1 :]
                if line.strip():
                    self._handle(loads(line), ep)

    def _handle(self, msg: dict[str, Any], ep: Endpoint) -> None:
        result = msg.get("result")
        if result is None:
            self._stream_error(msg.get("error"), ep)
            return
        if result.get("created"):
            if not self._next_rev:
                self._next_rev = header_revision(result) + 1
            self._stream_was_up = True
            self._retry.reset()
            if not self._created.is_set():
                log.debug("watch on %r created on %s", self.key, ep)
                self._created.set()
            return
        if result.get("canceled"):
            compact = to_int(result.get("compact_revision"))
            if compact:
                raise EtcdCompactedError(
                    f"watch on {self.key!r} cannot start at revision {self._next_rev}: "
                    f"etcd compacted history up to revision {compact}",
                    compact_revision=compact,
                    endpoint=ep.url,
                    key=self.key,
                )
            reason = result.get("cancel_reason") or "no reason given"
            if "no leader" in reason:
                raise _Resume(reason)
            raise EtcdWatchError(
                f"etcd cancelled the watch on {self.key!r}: {reason}", endpoint=ep.url, key=self.key
            )
        events = self._codec.events(result.get("events"))
        if events:
            put = self._queue.put
            for event in events:
                put(event)
            self._next_rev = events[-1].kv.mod_revision + 1
        elif result.get("header"):
            # Progress notification: everything up to the header's revision was seen.
            rev = header_revision(result)
            if rev >= self._next_rev and result.get("fragment") is None and self._created.is_set():
                self._next_rev = rev + 1

    def _stream_error(self, err: Any, ep: Endpoint) -> None:
        if isinstance(err, dict):
            code = err.get("grpc_code", err.get("code"))
            message = err.get("message") or str(err)
        else:
            code, message = None, str(err)
        exc = translate_error(
            "/v3/watch", ep.url, 200, {"code": code, "message": message}, self.key
        )
        if isinstance(exc, EtcdUnavailableError | EtcdTimeoutError):
            raise _Resume(str(exc)) from exc
        if isinstance(exc, EtcdAuthError) and any(t in message for t in _TOKEN_ERRORS):
            self._transport.authenticate(stale=self._transport.headers().get("Authorization"))
            raise _Resume("auth token refreshed") from exc
        raise exc


def _loads(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise EtcdClientError(f"etcd sent an invalid watch message: {data[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise EtcdClientError(f"etcd sent an unexpected watch message: {data[:200]!r}")
    return obj
