"""Junk at every key the engine reads (issue 10 item 4): a clear state error naming the
key within the join timeout, no thread death, no hang; the ``rdzv`` CLI prints an error.

Each junk kind is planted at each key, before a join (the first read meets it) and while
a lone leader waits for a second node (its watch meets it).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner

from etcd_rendezvous.cli import main
from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import (
    Rendezvous,
    RendezvousError,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from etcd_rendezvous.rendezvous._records import Keys, NodeRecord, StatusRecord, decode, encode
from etcd_rendezvous.server import EtcdServer

JOIN_TIMEOUT = 6.0
BOUND = 4.0  # a join returns or raises within its timeout plus this

# One value with every field any record kind checks first given the wrong type.
_WRONG_TYPES = {
    "format": 1,
    "round": "1",
    "node": 5,
    "by": 7,
    "min_nodes": "x",
    "seen": [],
}

KEYS: dict[str, Callable[[Keys], str]] = {
    "node": lambda k: k.node("intruder"),
    "leader": lambda k: k.leader,
    "round": lambda k: k.round,
    "status": lambda k: k.status,
    "closed": lambda k: k.closed,
    "config": lambda k: k.config,
}


def junk(kind: str, key_kind: str) -> bytes:
    if kind == "nested":
        return b"[" * 100_000
    if kind == "nested-field":
        return b'{"format": 1, "kind": "' + key_kind.encode() + b'", "data": ' + b"[" * 50_000
    if kind == "wrong-types":
        return json.dumps({**_WRONG_TYPES, "kind": key_kind}).encode()
    if kind == "huge":  # a million-digit number: past Python's int-parsing limit
        return b'{"format": 1, "kind": "' + key_kind.encode() + b'", "seen": ' + b"9" * 1_000_000
    if kind == "infinite":
        return json.dumps(
            {"format": 1, "kind": key_kind, "round": 1e400, "seen": 1e400, "by": 1e400}
            | {"node": None, "min_nodes": 1e400}
        ).encode()
    if kind == "truncated":
        return b'{"format": 1, "kind": "' + key_kind.encode() + b'", "rou'
    if kind == "pickle":
        return pickle.dumps({"format": 1, "kind": key_kind})
    if kind == "latin-1":
        return '{"format": 1, "kind": "nöde"}'.encode("latin-1")
    raise AssertionError(kind)


CLI = [sys.executable, "-m", "etcd_rendezvous"]
JUNK = [
    "nested",
    "nested-field",
    "wrong-types",
    "huge",
    "infinite",
    "truncated",
    "pickle",
    "latin-1",
]


@pytest.mark.parametrize("kind", JUNK)
@pytest.mark.parametrize("key_kind", list(KEYS))
def test_decode_turns_any_junk_into_a_state_error(kind: str, key_kind: str) -> None:
    key = KEYS[key_kind](Keys("job"))
    with pytest.raises(RendezvousStateError) as info:
        decode(junk(kind, key_kind), key=key, run_id="job")
    assert info.value.key == key
    assert len(str(info.value)) < 1000, "the message quotes the junk in full"


@pytest.fixture
def deaths(caplog: pytest.LogCaptureFixture) -> Iterator[list[logging.LogRecord]]:
    """Threads that died (the guard logs each death); the test asserts there were none."""
    caplog.set_level(logging.ERROR, logger="etcd_rendezvous.rendezvous._threads")
    died: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        died.append(args.exc_value if args.exc_value is not None else RuntimeError(args))
        previous(args)

    threading.excepthook = hook
    try:
        yield caplog.records
    finally:
        threading.excepthook = previous
    assert not died, f"threads died of uncaught exceptions: {died}"


def _join_fails_clearly(node: Rendezvous, key: str) -> None:
    start = time.monotonic()
    with pytest.raises(RendezvousStateError) as info:
        node.join(JOIN_TIMEOUT)
    took = time.monotonic() - start
    assert took < JOIN_TIMEOUT + BOUND, f"join took {took:.1f}s"
    assert info.value.key == key, info.value


@pytest.mark.parametrize("kind", JUNK)
@pytest.mark.parametrize("key_kind", list(KEYS))
def test_junk_before_the_join(
    etcd_client: EtcdClient, key_kind: str, kind: str, deaths: list[logging.LogRecord]
) -> None:
    keys = Keys("job")
    key = KEYS[key_kind](keys)
    etcd_client.put(key, junk(kind, key_kind))
    node = Rendezvous(etcd_client, "job", 2, 2, node_id="a", lease_ttl=5, probe=False)
    try:
        _join_fails_clearly(node, key)
    finally:
        start = time.monotonic()
        node.leave()
        assert time.monotonic() - start < BOUND
    assert not [r for r in deaths if r.name.endswith("_threads")]


@pytest.mark.parametrize("kind", JUNK)
@pytest.mark.parametrize("key_kind", list(KEYS))
def test_junk_while_the_leader_waits(
    etcd_client: EtcdClient, key_kind: str, kind: str, deaths: list[logging.LogRecord]
) -> None:
    keys = Keys("job")
    key = KEYS[key_kind](keys)
    node = Rendezvous(etcd_client, "job", 2, 2, node_id="a", lease_ttl=5, probe=False)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_join_fails_clearly, node, key)
            deadline = time.monotonic() + JOIN_TIMEOUT
            while not node.is_leader and not pending.done():
                assert time.monotonic() < deadline, "never led"
                time.sleep(0.01)
            etcd_client.put(key, junk(kind, key_kind))
            pending.result(JOIN_TIMEOUT + BOUND + 1)
        with pytest.raises(RendezvousStateError):  # every later call says so too
            node.num_nodes_waiting()
    finally:
        start = time.monotonic()
        node.leave()
        assert time.monotonic() - start < BOUND
    assert not [r for r in deaths if r.name.endswith("_threads")]


# --- the CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", JUNK)
@pytest.mark.parametrize("key_kind", list(KEYS))
def test_rdzv_show_and_list_print_an_error(
    etcd_server: EtcdServer, key_prefix: str, key_kind: str, kind: str
) -> None:
    keys = Keys("job", key_prefix)
    key = KEYS[key_kind](keys)
    with EtcdClient(etcd_server.endpoint) as client:
        client.put(key, junk(kind, key_kind))
    runner = CliRunner()
    args = ["--endpoints", etcd_server.endpoint, "--key-prefix", key_prefix]
    shown = runner.invoke(main, ["rdzv", "show", "job", *args])
    assert shown.exit_code == 1, shown.output
    assert key in shown.stderr and "invalid rendezvous record" in shown.stderr
    assert "Traceback" not in shown.output
    listed = runner.invoke(main, ["rdzv", "list", *args])
    assert listed.exit_code == 0, listed.output
    assert key in listed.stderr
    assert "Traceback" not in listed.output


def _watch_lines(endpoint: str, prefix: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    proc = subprocess.Popen(
        [*CLI, "rdzv", "watch", "job", "--json", "--endpoints", endpoint, "--key-prefix", prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _problem(lines: queue.Queue[str]) -> str:
    """The key of the next ``problem`` line."""
    while True:
        event = json.loads(lines.get(timeout=15))
        if event["event"] == "problem":
            return str(event["key"])


@pytest.mark.parametrize("kind", JUNK)
def test_rdzv_watch_reports_junk_and_goes_on(
    etcd_server: EtcdServer, key_prefix: str, kind: str
) -> None:
    keys = Keys("job", key_prefix)
    with EtcdClient(etcd_server.endpoint) as client:
        client.put(keys.node("first"), junk(kind, "node"))  # in the opening snapshot
        proc, lines = _watch_lines(etcd_server.endpoint, key_prefix)
        try:
            assert _problem(lines) == keys.node("first")
            for key_kind, key_of in KEYS.items():  # then as watch events
                client.put(key_of(keys), junk(kind, key_kind))
                assert _problem(lines) == key_of(keys)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
    assert "Traceback" not in err, err


# --- a thread that dies fails its waiters -------------------------------------------------


class _BrokenInThread:
    """A monotonic clock that raises once called from a thread whose name starts with
    ``prefix`` (a fault planted in that thread: no etcd is faked)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.armed = threading.Event()

    def __call__(self) -> float:
        if self.armed.is_set() and threading.current_thread().name.startswith(self.prefix):
            raise RuntimeError(f"planted fault in {threading.current_thread().name}")
        return time.monotonic()


@pytest.mark.parametrize("thread", ["rendezvous job ", "rendezvous-hub job"])
def test_a_dead_thread_fails_the_join_with_its_cause(
    etcd_client: EtcdClient, thread: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = _BrokenInThread(thread)
    # the leader's decision loop is "rendezvous job <node>"; the other follows on the hub
    a = Rendezvous(etcd_client, "job", 3, 3, node_id="a", lease_ttl=5, probe=False, clock=clock)
    b = Rendezvous(etcd_client, "job", 3, 3, node_id="b", lease_ttl=5, probe=False, clock=clock)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            joins = [pool.submit(node.join, JOIN_TIMEOUT) for node in (a, b)]
            deadline = time.monotonic() + JOIN_TIMEOUT
            while not (a.is_leader or b.is_leader):
                assert time.monotonic() < deadline, "never led"
                time.sleep(0.01)
            leader = a if a.is_leader else b
            waiter = leader if thread == "rendezvous job " else {a: b, b: a}[leader]
            clock.armed.set()
            # wake both threads with a valid event
            etcd_client.put(Keys("job").status, encode(StatusRecord(0, 0, 0, 0)))
            start = time.monotonic()
            future = joins[[a, b].index(waiter)]
            with pytest.raises(RendezvousError) as info:
                future.result(JOIN_TIMEOUT + BOUND)
            took = time.monotonic() - start
        assert not isinstance(info.value, RendezvousTimeoutError), f"after {took:.1f}s"
        assert "planted fault" in str(info.value)
        assert isinstance(info.value.__cause__, RuntimeError)
    finally:
        clock.armed.clear()
        a.leave()
        b.leave()


def test_an_oversized_value_is_refused_before_parsing() -> None:
    """Larger than etcd's request limit allows by default: not parsed at all."""
    key = Keys("job").status
    value = b'{"format": 1, "kind": "status", "x": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    with pytest.raises(RendezvousStateError, match="bytes long") as info:
        decode(value, key=key, run_id="job")
    assert info.value.key == key and len(str(info.value)) < 1000


@pytest.mark.parametrize("opening", [b"[", b'{"k": ', b'[{"k": '])
def test_deep_nesting_is_refused_before_parsing(opening: bytes) -> None:
    """``json.loads`` never recurses into junk: near the interpreter's recursion limit a
    garbage collection fails unrelated finalizers (seen on CI, Python 3.10)."""
    key = Keys("job").status
    with pytest.raises(RendezvousStateError, match="nested deeper than 32 levels") as info:
        decode(opening * 50_000, key=key, run_id="job")
    assert info.value.__cause__ is None  # refused by the count, not a RecursionError


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Data values full of brackets (and escaped quotes) are a record like any other."""
    node = NodeRecord(node_id="node-a", seen=1, data={"args": '["[[\\"' * 200, "{": "}" * 99})
    key = Keys("job").node("node-a")
    assert decode(encode(node), key=key, run_id="job") == node
