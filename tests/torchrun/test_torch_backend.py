"""Contract tests for EtcdRendezvousBackend against real etcd.

The first block is torch's ``RendezvousBackendTestMixin``
(test/distributed/elastic/rendezvous/rendezvous_backend_test.py), case for case;
the rest covers what the mixin does not: contention, TTL, corrupt and hostile
states, connection errors.
"""

from __future__ import annotations

import pickle
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

pytest.importorskip("torch")

from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousStateError,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    RendezvousBackend,
    Token,
    _NodeDesc,
    _RendezvousState,
)

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdClientError
from etcd_rendezvous.server import EtcdServer
from etcd_rendezvous.torchrun import EtcdRendezvousBackend
from etcd_rendezvous.torchrun.backend import decode_state, encode_state

pytestmark = pytest.mark.torch


@pytest.fixture
def backend(etcd_client: EtcdClient) -> EtcdRendezvousBackend:
    # The mixin stores arbitrary bytes (b"x"), so the pickle check is off here.
    return EtcdRendezvousBackend(etcd_client, "run-1", "/test/prefix", check_states=False)


def _corrupt_state(client: EtcdClient, backend: EtcdRendezvousBackend) -> None:
    client.put(backend.key, b"non_base64")


def _set_state(
    backend: RendezvousBackend, state: bytes, token: Any | None = None
) -> tuple[bytes, Token, bool]:
    result = backend.set_state(state, token)
    assert result is not None
    return result


# -- torch's RendezvousBackendTestMixin ------------------------------------------------


def test_get_state_returns_backend_state(backend: EtcdRendezvousBackend) -> None:
    backend.set_state(b"x")
    result = backend.get_state()
    assert result is not None
    state, token = result
    assert state == b"x"
    assert token is not None


def test_get_state_returns_none_if_backend_state_does_not_exist(
    backend: EtcdRendezvousBackend,
) -> None:
    assert backend.get_state() is None


def test_get_state_raises_error_if_backend_state_is_corrupt(
    backend: EtcdRendezvousBackend, etcd_client: EtcdClient
) -> None:
    _corrupt_state(etcd_client, backend)
    with pytest.raises(RendezvousStateError):
        backend.get_state()


def test_set_state_sets_backend_state_if_it_does_not_exist(
    backend: EtcdRendezvousBackend,
) -> None:
    state, token, has_set = _set_state(backend, b"x")
    assert state == b"x"
    assert token is not None
    assert has_set


def test_set_state_sets_backend_state_if_token_is_current(
    backend: EtcdRendezvousBackend,
) -> None:
    _, token1, has_set1 = _set_state(backend, b"x")
    state2, token2, has_set2 = _set_state(backend, b"y", token1)
    assert state2 == b"y"
    assert token1 != token2
    assert has_set1
    assert has_set2


def test_set_state_returns_current_backend_state_if_token_is_old(
    backend: EtcdRendezvousBackend,
) -> None:
    _, token1, _ = _set_state(backend, b"x")
    state2, token2, _ = _set_state(backend, b"y", token1)
    state3, token3, has_set = _set_state(backend, b"z", token1)
    assert state2 == state3
    assert token2 == token3
    assert not has_set


def test_set_state_returns_current_backend_state_if_token_is_none(
    backend: EtcdRendezvousBackend,
) -> None:
    state1, token1, _ = _set_state(backend, b"x")
    state2, token2, has_set = _set_state(backend, b"y")
    assert state1 == state2
    assert token1 == token2
    assert not has_set


def test_set_state_returns_current_backend_state_if_token_is_invalid(
    backend: EtcdRendezvousBackend,
) -> None:
    state1, token1, _ = _set_state(backend, b"x")
    state2, token2, has_set = _set_state(backend, b"y", token="invalid")
    assert state1 == state2
    assert token1 == token2
    assert not has_set


# -- beyond the mixin --------------------------------------------------------------------


def test_name_and_key_layout(etcd_client: EtcdClient) -> None:
    b = EtcdRendezvousBackend(etcd_client, "job/with slash")
    assert b.name == "etcd-v3"
    # The run id is escaped: it cannot reach into another run's keys.
    assert b.key == b"/torch/elastic/rendezvous/job%2Fwith%20slash/state"
    with pytest.raises(ValueError, match="run id"):
        EtcdRendezvousBackend(etcd_client, "")


def test_stored_value_is_bytes_with_header(
    backend: EtcdRendezvousBackend, etcd_client: EtcdClient
) -> None:
    payload = bytes(range(256))
    _set_state(backend, payload)
    kv = etcd_client.get(backend.key)
    assert kv is not None
    assert kv.value == encode_state(payload)
    assert decode_state(kv.value) == payload
    assert len(kv.value) == len(payload) + 11


def test_token_is_mod_revision(backend: EtcdRendezvousBackend, etcd_client: EtcdClient) -> None:
    _, token, _ = _set_state(backend, b"x")
    kv = etcd_client.get(backend.key)
    assert kv is not None
    assert token == kv.mod_revision


def test_set_state_returns_none_when_state_deleted_under_us(
    backend: EtcdRendezvousBackend, etcd_client: EtcdClient
) -> None:
    _, token, _ = _set_state(backend, b"x")
    etcd_client.delete(backend.key)
    assert backend.set_state(b"y", token) is None


def test_state_has_a_ttl_lease(etcd_client: EtcdClient) -> None:
    b = EtcdRendezvousBackend(etcd_client, "ttl-run", ttl=120, check_states=False)
    _set_state(b, b"x")
    kv = etcd_client.get(b.key)
    assert kv is not None and kv.lease != 0
    info = etcd_client.lease_time_to_live(kv.lease)
    assert info.granted_ttl == 120
    assert 100 < info.ttl <= 120


def test_state_expires_with_its_lease(etcd_client: EtcdClient) -> None:
    b = EtcdRendezvousBackend(etcd_client, "short", ttl=1, check_states=False)
    _set_state(b, b"x")
    deadline = time.monotonic() + 10
    while b.get_state() is not None:
        assert time.monotonic() < deadline, "the state outlived its TTL"
        time.sleep(0.1)


def test_revoked_lease_is_replaced(etcd_client: EtcdClient) -> None:
    b = EtcdRendezvousBackend(etcd_client, "revoked", check_states=False)
    _set_state(b, b"x")
    kv = etcd_client.get(b.key)
    assert kv is not None
    etcd_client.lease_revoke(kv.lease)  # deletes the key too
    assert b.get_state() is None
    state, _, has_set = _set_state(b, b"y")
    assert (state, has_set) == (b"y", True)


def test_set_state_is_exact_under_contention(etcd_client: EtcdClient) -> None:
    """8 threads each add 15 entries by CAS loops: none lost, none duplicated."""
    writers, per_writer = 8, 15
    backends = [
        EtcdRendezvousBackend(etcd_client, "contended", check_states=False) for _ in range(writers)
    ]
    lost = [0]
    lock = threading.Lock()

    def writer(idx: int, b: EtcdRendezvousBackend) -> None:
        for n in range(per_writer):
            current = b.get_state()
            while True:
                items: list[str] = [] if current is None else pickle.loads(current[0])
                new = pickle.dumps([*items, f"{idx}-{n}"])
                result = b.set_state(new, None if current is None else current[1])
                assert result is not None
                state, token, has_set = result
                if has_set:
                    break
                with lock:
                    lost[0] += 1
                current = (state, token)

    threads = [threading.Thread(target=writer, args=(i, b)) for i, b in enumerate(backends)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    final = backends[0].get_state()
    assert final is not None
    items = pickle.loads(final[0])
    assert sorted(items) == sorted(f"{i}-{n}" for i in range(writers) for n in range(per_writer))


# -- corrupt and hostile states -----------------------------------------------------------


def _real_state() -> bytes:
    state = _RendezvousState()
    node = _NodeDesc("host-a", 1234, 0)
    state.participants[node] = 0
    state.wait_list.add(_NodeDesc("host-b", 99, 1))
    state.last_heartbeats[node] = datetime.now(timezone.utc)
    state.deadline = datetime.now(timezone.utc)
    return pickle.dumps(state)


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage", id="no-header"),
        pytest.param(encode_state(b"payload")[:-1], id="truncated"),
        pytest.param(encode_state(b"payload")[:-1] + b"X", id="bit-flip"),
        pytest.param(b"\x00ERDZ1\n", id="header-only"),
    ],
)
def test_corrupt_values_raise_state_error(etcd_client: EtcdClient, stored: bytes) -> None:
    b = EtcdRendezvousBackend(etcd_client, "corrupt")
    etcd_client.put(b.key, stored)
    with pytest.raises(RendezvousStateError, match="corrupt") as info:
        b.get_state()
    assert "corrupt" in str(info.value) and "'corrupt'" in str(info.value)  # names the run
    assert info.value.__cause__ is not None
    # A CAS against it fails the same clear way (the failure branch returns it).
    with pytest.raises(RendezvousStateError):
        b.set_state(_real_state(), 1)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(pickle.dumps(_Evil()), id="code-execution"),
        pytest.param(pickle.dumps({"not": "a state"}), id="wrong-type"),
        pytest.param(b"\x80\x05garbage", id="bad-pickle"),
        pytest.param(_real_state()[:-5], id="truncated-pickle"),
    ],
)
def test_hostile_states_are_refused_before_torch_unpickles(
    etcd_client: EtcdClient, payload: bytes
) -> None:
    b = EtcdRendezvousBackend(etcd_client, "hostile")
    etcd_client.put(b.key, encode_state(payload))
    with pytest.raises(RendezvousStateError, match="not written by this backend"):
        b.get_state()


def test_real_states_pass_the_check(etcd_client: EtcdClient) -> None:
    b = EtcdRendezvousBackend(etcd_client, "real")
    state = _real_state()
    assert _set_state(b, state)[2]
    result = b.get_state()
    assert result is not None and result[0] == state
    assert pickle.loads(result[0]).participants[_NodeDesc("host-a", 1234, 0)] == 0


# -- connection errors ------------------------------------------------------------------


@pytest.fixture
def dead_client() -> Iterator[EtcdClient]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = EtcdClient(f"127.0.0.1:{port}", timeout=1.0)
    yield client
    client.close()


def test_connection_errors_are_translated_with_cause(dead_client: EtcdClient) -> None:
    b = EtcdRendezvousBackend(dead_client, "gone")
    for call in (b.get_state, lambda: b.set_state(b"x"), lambda: b.set_state(b"x", 5)):
        with pytest.raises(RendezvousConnectionError) as info:
            call()
        assert isinstance(info.value.__cause__, EtcdClientError)
        assert "'gone'" in str(info.value)
        assert dead_client.endpoints[0] in str(info.value)


# -- planted states: every field of torch's state is checked (issue 10 item 6) ------------


def _planted(**fields: Any) -> bytes:
    """A real state with ``fields`` replaced; ``node_*`` replace fields of its participant."""
    state = _RendezvousState()
    node = _NodeDesc("host-a", 1234, 0)
    state.participants[node] = 0
    state.last_heartbeats[node] = datetime.now(timezone.utc)
    node_fields = {k[5:]: v for k, v in fields.items() if k.startswith("node_")}
    if node_fields:
        planted = _NodeDesc("host-p", 1, 0)
        for name, value in node_fields.items():
            object.__setattr__(planted, name, value)  # frozen: as a hostile writer would
        state.wait_list.add(planted)
    for name, value in fields.items():
        if not name.startswith("node_"):
            if value is _MISSING:
                delattr(state, name)
            else:
                setattr(state, name, value)
    return pickle.dumps(state)


_MISSING = object()
_NODE = _NodeDesc("host-b", 99, 1)
_NOW = datetime.now(timezone.utc)
PLANTED: dict[str, tuple[dict[str, Any], str]] = {
    "string-rank": (dict(participants={_NODE: "0"}), "rank of participant"),
    "bool-rank": (dict(participants={_NODE: True}), "rank of participant"),
    "negative-rank": (dict(participants={_NODE: -1}), "rank of participant"),
    "participant-not-a-node": (dict(participants={"host-b_99_1": 0}), "node descriptor"),
    "participants-a-list": (dict(participants=[_NODE]), "'participants' must be a dict"),
    "round-a-string": (dict(round="1"), "'round'"),
    "round-a-bool": (dict(round=True), "'round'"),
    "complete-an-int": (dict(complete=1), "'complete' must be a bool"),
    "closed-a-string": (dict(closed="no"), "'closed' must be a bool"),
    "deadline-a-float": (dict(deadline=1.5), "'deadline' must be a datetime"),
    "deadline-naive": (dict(deadline=datetime(2026, 1, 1)), "timezone-aware"),
    "wait-list-a-list": (dict(wait_list=[_NODE]), "'wait_list' must be a set"),
    "wait-list-of-strings": (dict(wait_list={"x"}), "node of 'wait_list'"),
    "redundancy-list-a-dict": (dict(redundancy_list={}), "'redundancy_list' must be a set"),
    "heartbeat-a-float": (dict(last_heartbeats={_NODE: 1.5}), "last heartbeat"),
    "heartbeat-naive": (dict(last_heartbeats={_NODE: datetime(2026, 1, 1)}), "timezone-aware"),
    "heartbeats-a-list": (dict(last_heartbeats=[]), "'last_heartbeats' must be a dict"),
    "field-missing": (dict(participants=_MISSING), "'participants' is missing"),
    "node-pid-a-string": (dict(node_pid="1"), "pid of"),
    "node-local-id-a-float": (dict(node_local_id=0.5), "local_id of"),
    "node-addr-an-int": (dict(node_addr=7), "string addr"),
    "nested-deep": (dict(participants={_NODE: 0}, round=[[[[[]]]]]), "'round'"),
}


@pytest.mark.parametrize("case", list(PLANTED))
def test_planted_states_with_wrong_types_are_refused(etcd_client: EtcdClient, case: str) -> None:
    fields, message = PLANTED[case]
    b = EtcdRendezvousBackend(etcd_client, "planted")
    etcd_client.put(b.key, encode_state(_planted(**fields)))
    with pytest.raises(RendezvousStateError, match="not written by this backend") as info:
        b.get_state()
    assert message in str(info.value), info.value
    assert "'planted'" in str(info.value)  # names the run
    with pytest.raises(RendezvousStateError):  # a CAS against it fails the same clear way
        b.set_state(_real_state(), 1)


def test_a_planted_string_rank_fails_next_rendezvous_within_its_timeout(
    etcd_server: EtcdServer, key_prefix: str
) -> None:
    """It hung ``next_rendezvous()`` past its join timeout; now torch never sees it."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from etcd_rendezvous.torchrun.plugin import create_rdzv_handler

    run_id = f"planted-{time.monotonic_ns()}"
    params = RendezvousParameters(
        "etcd-v3-dynamic",
        etcd_server.endpoint,
        run_id,
        2,
        2,
        key_prefix=key_prefix,
        join_timeout="5",
        last_call_timeout="1",
    )
    handler = create_rdzv_handler(params)
    with etcd_server.get_client() as client:
        key = EtcdRendezvousBackend(client, run_id, key_prefix).key
        client.put(key, encode_state(_planted(participants={_NODE: "0"})))
    start = time.monotonic()
    try:
        with pytest.raises(RendezvousStateError, match="rank of participant"):
            handler.next_rendezvous()
    finally:
        handler.shutdown()
    took = time.monotonic() - start
    assert took < 5 + 5, f"next_rendezvous took {took:.1f}s"
