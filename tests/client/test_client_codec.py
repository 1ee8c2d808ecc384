"""The gateway codec and endpoint parsing: pure functions, no etcd."""

from __future__ import annotations

import base64
import http.client
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from urllib3.exceptions import ProtocolError

from etcd_rendezvous.client import Compare, Op, parse_endpoints
from etcd_rendezvous.client._codec import (
    ALL_KEYS,
    EMPTY_REPLY_WITH_TOKEN,
    Codec,
    decode_error,
    empty_reply_message,
    prefix_range_end,
)
from etcd_rendezvous.client._endpoints import Endpoint
from etcd_rendezvous.client._retry import Retry
from etcd_rendezvous.client._transport import _TOKEN_ERRORS, translate_error
from etcd_rendezvous.errors import (
    EtcdAuthError,
    EtcdCompactedError,
    EtcdLeaseNotFoundError,
    EtcdRequestError,
    EtcdTimeoutError,
    EtcdUnavailableError,
)

keys = st.binary(min_size=1, max_size=64)
values = st.binary(max_size=256)
int64 = st.integers(min_value=0, max_value=2**63 - 1)


def _as_etcd_sends(
    req_kv: dict[str, str], create: int, mod: int, version: int, lease: int
) -> dict[str, str]:
    """A KeyValue the way the gateway sends it: zero values left out, int64 as strings."""
    data = {"key": req_kv["key"]}
    if req_kv["value"]:
        data["value"] = req_kv["value"]
    for name, number in (
        ("create_revision", create),
        ("mod_revision", mod),
        ("version", version),
        ("lease", lease),
    ):
        if number:
            data[name] = str(number)
    return data


@given(ns=st.binary(max_size=16), key=keys, value=values, c=int64, m=int64, v=int64, lease=int64)
def test_put_request_round_trips_through_the_reply_decoder(
    ns: bytes, key: bytes, value: bytes, c: int, m: int, v: int, lease: int
) -> None:
    codec = Codec(ns)
    req = codec.put_request(key, value, lease or None)
    assert base64.b64decode(req["key"]) == ns + key
    if lease:
        assert req["lease"] == str(lease)
    kv = codec.kv(_as_etcd_sends(req, c, m, v, lease))
    assert (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
        key,
        value,
        c,
        m,
        v,
        lease,
    )


@given(prefix=st.binary(max_size=8), rest=st.binary(max_size=8))
def test_prefix_range_end_bounds_exactly_the_prefix(prefix: bytes, rest: bytes) -> None:
    end = prefix_range_end(prefix)
    key = prefix + rest
    if end == ALL_KEYS:
        assert set(prefix) <= {0xFF}
    else:
        assert prefix <= key < end
        assert not end.startswith(prefix)


def test_prefix_range_end_examples() -> None:
    assert prefix_range_end(b"a") == b"b"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == ALL_KEYS
    assert prefix_range_end(b"") == ALL_KEYS


def test_namespace_confines_ranges() -> None:
    codec = Codec(b"/ns/")
    end = codec.range_end(b"", ALL_KEYS, prefix=False)
    assert end is not None and base64.b64decode(end) == b"/ns0"
    end = codec.range_end(b"", None, prefix=True)
    assert end is not None and base64.b64decode(end) == b"/ns0"
    end = codec.range_end(b"a", b"c", prefix=False)
    assert end is not None and base64.b64decode(end) == b"/ns/c"
    with pytest.raises(ValueError, match="either"):
        codec.range_end(b"a", b"c", prefix=True)
    assert codec.strip(b"/ns/key") == b"key"


def test_zero_values_left_out_decode_to_defaults() -> None:
    codec = Codec()
    resp = codec.range_response({"header": {"revision": "7"}})
    assert (resp.kvs, resp.count, resp.more, resp.revision) == ([], 0, False, 7)
    txn = codec.txn_response(
        {"header": {"revision": "9"}, "responses": [{"response_txn": {"header": {}}}]}
    )
    assert not txn.succeeded
    assert txn.responses[0].revision == 9  # nested replies have no header revision
    (event,) = codec.events([{"type": "DELETE", "kv": {"key": "YQ==", "mod_revision": "3"}}])
    assert (event.type, event.key, event.value, event.revision) == ("DELETE", b"a", b"", 3)


def test_compare_and_op_encoding() -> None:
    codec = Codec(b"n/")
    assert codec.compare(Compare.version("k", "==", 0)) == {
        "key": base64.b64encode(b"n/k").decode(),
        "result": "EQUAL",
        "target": "VERSION",
        "version": "0",
    }
    assert codec.compare(Compare.value("k", "!=", b"\x00"))["value"] == "AA=="
    assert codec.compare(Compare.lease("k", ">", 5))["lease"] == "5"
    assert "range_end" in codec.compare(Compare.mod_revision("k", "<", 5, prefix=True))
    with pytest.raises(ValueError, match="compare operator"):
        Compare.version("k", "=", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Op\.get"):
        codec.op(object())  # type: ignore[arg-type]
    req = codec.txn_request([], [Op.txn([], [Op.delete("a", prefix=True)])], [])
    assert "request_txn" in req["success"][0]
    with pytest.raises(TypeError):
        Op.put(1, "v")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:2379", [Endpoint("http", "127.0.0.1", 2379)]),
        ("http://localhost:1234", [Endpoint("http", "localhost", 1234)]),
        ("https://h:1", [Endpoint("https", "h", 1)]),
        ("[::1]:2379", [Endpoint("http", "::1", 2379)]),
        ("http://[fe80::1]:5", [Endpoint("http", "fe80::1", 5)]),
        ("a:1, b:2,a:1", [Endpoint("http", "a", 1), Endpoint("http", "b", 2)]),
        ("hostonly", [Endpoint("http", "hostonly", 2379)]),
    ],
)
def test_parse_endpoints(text: str, expected: list[Endpoint]) -> None:
    assert parse_endpoints(text) == expected


def test_parse_endpoints_sequence_ipv6_netloc_and_tls_default() -> None:
    eps = parse_endpoints(["[::1]:1", "x:2"], default_scheme="https")
    assert [e.url for e in eps] == ["https://[::1]:1", "https://x:2"]


@pytest.mark.parametrize("bad", ["", " , ", "ftp://h:1", "h:notaport", "http://h:1/path"])
def test_parse_endpoints_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoints(bad)


@pytest.mark.parametrize(
    ("code", "message", "cls"),
    [
        (14, "etcdserver: no leader", EtcdUnavailableError),
        (4, "context deadline exceeded", EtcdTimeoutError),
        (16, "etcdserver: invalid auth token", EtcdAuthError),
        (7, "etcdserver: permission denied", EtcdAuthError),
        (3, "etcdserver: authentication failed, invalid user ID or password", EtcdAuthError),
        (5, "etcdserver: requested lease not found", EtcdLeaseNotFoundError),
        (11, "etcdserver: mvcc: required revision has been compacted", EtcdCompactedError),
        (3, "etcdserver: key not found", EtcdRequestError),
    ],
)
def test_translate_error(code: int, message: str, cls: type[Exception]) -> None:
    body = f'{{"error":"{message}","code":{code},"message":"{message}"}}'.encode()
    err = translate_error("/v3/kv/put", "http://h:1", 400, body, key=b"k")
    assert type(err) is cls
    assert "http://h:1" in str(err) and "b'k'" in str(err) and message in str(err)
    assert err.endpoint == "http://h:1" and err.key == b"k"


def test_translate_error_non_json() -> None:
    err = translate_error("/v3/kv/put", "http://h:1", 502, b"<html>bad gateway</html>")
    assert isinstance(err, EtcdRequestError) and "HTTP 502" in str(err)


def test_retry_is_bounded_with_backoff_and_jitter() -> None:
    now = [0.0]
    retry = Retry(
        deadline=1.0, delay=0.1, backoff=2.0, max_delay=0.3, jitter=0.0, clock=lambda: now[0]
    )
    delays = []
    while (d := retry.next_delay()) is not None:
        delays.append(d)
        now[0] += d
    assert delays[:3] == [0.1, 0.2, 0.3]
    assert sum(delays) <= 1.0 + 1e-9
    retry.reset()
    assert retry.attempts == 0 and retry.remaining() == 1.0
    capped = Retry(max_tries=2, jitter=0.5, rand=lambda: 1.0, delay=0.1)
    assert capped.next_delay() == pytest.approx(0.15)
    assert capped.next_delay() is None


# -- error replies of both gateway generations ------------------------------------------
#
# Recorded from the sources that write them (the strings are what those lines marshal,
# field names as etcd's marshaler emits them: proto names, zero values left out):
# * grpc-gateway v1, used by etcd 3.4 and 3.5 (github.com/grpc-ecosystem/grpc-gateway
#   v1.16.0): runtime/errors.go DefaultHTTPError marshals internal.Error{Error, Message,
#   Code, Details}; runtime/handler.go handleForwardResponseStreamError marshals
#   {"error": internal.StreamError{grpc_code, http_code, message, http_status, details}}.
# * grpc-gateway v2, used by etcd 3.6+ (etcd-io/etcd server/embed/serve.go registers it
#   with protojson UseProtoNames, EmitUnpopulated=false): runtime/errors.go
#   DefaultHTTPErrorHandler marshals the google.rpc.Status {code, message, details} (its
#   fallback: `{"code": 13, "message": "failed to marshal error message"}`);
#   runtime/handler.go errorChunk marshals {"error": Status}, with the HTTP status of
#   the code when the stream fails before its first message.
# * etcd 3.5.30 from Debian sid (built with grpc-gateway v2): replies seen on the binary,
#   including protojson's random space after a comma.
V1_UNARY = b'{"error":"etcdserver: no leader","code":14,"message":"etcdserver: no leader"}'
V1_STREAM = (
    b'{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader",'
    b'"http_status":"Service Unavailable"}}'
)
V2_UNARY = b'{"code":14,"message":"etcdserver: no leader","details":[]}'
V2_UNARY_NO_DETAILS = b'{"code":16, "message":"etcdserver: invalid auth token"}'
V2_STREAM = b'{"error":{"code":16,"message":"etcdserver: invalid auth token","details":[]}}\n'
V2_STREAM_3530 = b'{"error":{"code":3,"message":"etcdserver: user name is empty"}}\n'
V2_FALLBACK = b'{"code": 13, "message": "failed to marshal error message"}'


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (V1_UNARY, 14, "etcdserver: no leader"),
        (V1_STREAM, 14, "etcdserver: no leader"),
        (V2_UNARY, 14, "etcdserver: no leader"),
        (V2_UNARY_NO_DETAILS, 16, "etcdserver: invalid auth token"),
        (V2_STREAM, 16, "etcdserver: invalid auth token"),
        (V2_STREAM_3530, 3, "etcdserver: user name is empty"),
        (V2_FALLBACK, 13, "failed to marshal error message"),
        ({"code": "5", "message": "etcdserver: requested lease not found"}, 5, None),
        (b'{"code":14}', 14, "gRPC status 14"),
    ],
)
def test_decode_error_reads_both_gateway_formats(
    body: bytes | dict[str, str], code: int, message: str | None
) -> None:
    error = decode_error(body)
    assert error is not None
    assert error.code == code
    if message is not None:
        assert error.message == message


@pytest.mark.parametrize(
    "body", [b"", b"  \n", b"Not Found\n", b"<html>bad gateway</html>", b"[1]", b'{"header":{}}']
)
def test_decode_error_none_for_what_is_not_an_error(body: bytes) -> None:
    assert decode_error(body) is None


@pytest.mark.parametrize("template", ["v1", "v2", "v1-stream", "v2-stream"])
@pytest.mark.parametrize(
    ("code", "message", "cls"),
    [
        (14, "etcdserver: no leader", EtcdUnavailableError),
        (4, "context deadline exceeded", EtcdTimeoutError),
        (16, "etcdserver: invalid auth token", EtcdAuthError),
        (3, "etcdserver: user name is empty", EtcdAuthError),
        (5, "etcdserver: requested lease not found", EtcdLeaseNotFoundError),
        (11, "etcdserver: mvcc: required revision has been compacted", EtcdCompactedError),
        (3, "etcdserver: key not found", EtcdRequestError),
    ],
)
def test_translate_error_same_exception_for_every_format(
    template: str, code: int, message: str, cls: type[Exception]
) -> None:
    body = {
        "v1": {"error": message, "code": code, "message": message},
        "v2": {"code": code, "message": message, "details": []},
        "v1-stream": {"error": {"grpc_code": code, "http_code": 400, "message": message}},
        "v2-stream": {"error": {"code": code, "message": message, "details": []}},
    }[template]
    err = translate_error("/v3/lease/keepalive", "http://h:1", 400, json.dumps(body).encode())
    assert type(err) is cls, err
    assert str(err) == f"etcd /v3/lease/keepalive on http://h:1 failed: {message}"


def test_empty_error_body_on_401_is_an_auth_error_that_refreshes_the_token() -> None:
    err = translate_error("/v3/kv/range", "http://h:1", 401, b"")
    assert isinstance(err, EtcdAuthError)
    # The transport fetches a new token on these words, then resends the request once.
    assert any(t in str(err) for t in _TOKEN_ERRORS)
    assert "15256" in str(err) and "HTTP 401" in str(err)
    other = translate_error("/v3/kv/range", "http://h:1", 503, b"")
    assert type(other) is EtcdRequestError and "HTTP 503" in str(other)


def test_empty_reply_is_recognised_through_the_exception_chain() -> None:
    # What urllib3 raises when etcd closes the connection without a reply (etcd issues
    # 15256, 20332: `curl: (52) Empty reply from server`), wrapped as the transport does.
    dropped = ProtocolError(
        "Connection aborted.",
        http.client.RemoteDisconnected("Remote end closed connection without response"),
    )
    try:
        raise EtcdUnavailableError("no etcd endpoint reachable for /v3/kv/range") from dropped
    except EtcdUnavailableError as exc:
        assert empty_reply_message(exc) == EMPTY_REPLY_WITH_TOKEN
    refused = ProtocolError("Connection aborted.", ConnectionRefusedError(111, "refused"))
    assert empty_reply_message(refused) is None
    assert empty_reply_message(None) is None


def test_an_old_auth_revision_is_a_token_error_that_is_retried() -> None:
    """Permissions changed since the token was issued: etcd's applier refuses the request
    (code 2, Unknown) before applying it; a fresh token and the request again cure it."""
    message = "auth: revision in header is old"
    body = f'{{"error":"{message}","code":2,"message":"{message}"}}'.encode()
    err = translate_error("/v3/kv/txn", "http://e:1", 400, body, b"k")
    assert isinstance(err, EtcdAuthError), err
    assert any(token in str(err) for token in _TOKEN_ERRORS), err
