"""The v3 JSON gateway's quirks, handled in one place.

The gateway speaks protobuf-as-JSON:

* ``bytes`` fields (keys, values, range ends) are base64 strings;
* ``int64`` fields (revisions, versions, lease ids, counts) are decimal
  strings, and they are parsed with ``int()`` whether quoted or not;
* fields at their zero value are left out of replies (a missing ``count``
  is 0, a missing ``value`` is ``b""``, a missing ``succeeded`` is false);
* enums are their names (``"EQUAL"``, ``"DELETE"``); a missing event type is
  ``PUT`` (enum value 0).

A :class:`Codec` also applies the client's namespace: every key sent gets the
prefix, every key received loses it.

Error replies come in two formats, decoded by :func:`decode_error`, because etcd
moved its gateway from grpc-gateway v1 to v2 in 3.6 (Debian's 3.5.30 is built with
v2 too):

* v1 (etcd 3.4, 3.5): ``{"error": msg, "code": c, "message": msg}``; inside a
  stream ``{"error": {"grpc_code": c, "http_code": h, "message": msg,
  "http_status": s}}``;
* v2 (etcd 3.6+): ``{"code": c, "message": msg, "details": [...]}`` (a
  ``google.rpc.Status``; no ``error`` field); inside a stream ``{"error": {"code":
  c, "message": msg, "details": [...]}}``, also as the whole body of a stream that
  failed before its first message (then with an HTTP error status);
* no body at all: etcd can answer a request carrying an invalid auth token with an
  empty reply (etcd issues 15256 and 20332), see :func:`empty_reply_message`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import http.client
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etcd_rendezvous.client._types import (
    DeleteResponse,
    KeyValue,
    OpResponse,
    PutResponse,
    RangeResponse,
    TxnResponse,
    WatchEvent,
)
from etcd_rendezvous.client.txn import (
    AnyOp,
    Compare,
    DeleteOp,
    PutOp,
    RangeOp,
    SortOrder,
    SortTarget,
    TxnOp,
)
from etcd_rendezvous.errors import EtcdRequestError

Json = dict[str, Any]

_b64encode = base64.b64encode
_b64decode = base64.b64decode

_COMPARE_FIELDS = {
    "VALUE": "value",
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "LEASE": "lease",
}

# etcd's "from this key to the end of the keyspace" range end.
ALL_KEYS = b"\0"


def b64(data: bytes) -> str:
    """Encode bytes the way the gateway wants them."""
    return _b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """Decode a base64 field of a reply."""
    try:
        return _b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise EtcdRequestError(f"etcd sent an invalid base64 field: {text!r:.80}") from exc


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``.

    An empty prefix, or one made only of ``0xff`` bytes, has no such key: the
    range runs to the end of the keyspace (``b"\\0"``).
    """
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return ALL_KEYS


def to_int(value: Any) -> int:
    """Parse an int64 field, which the gateway sends as a string (or leaves out)."""
    return int(value) if value is not None else 0


class Codec:
    """Encodes requests and decodes replies for one namespace."""

    __slots__ = ("_ns", "_ns_len", "namespace")

    def __init__(self, namespace: bytes = b"") -> None:
        self.namespace = namespace
        self._ns = namespace
        self._ns_len = len(namespace)

    # -- keys ----------------------------------------------------------------

    def key(self, key: bytes) -> str:
        """The namespaced, encoded key."""
        return b64(self._ns + key) if self._ns_len else b64(key)

    def strip(self, key: bytes) -> bytes:
        """Remove the namespace from a key that etcd returned."""
        if self._ns_len and key.startswith(self._ns):
            return key[self._ns_len :]
        return key

    def range_end(self, key: bytes, range_end: bytes | None, prefix: bool) -> str | None:
        """The encoded range end for ``key`` with either ``prefix`` or ``range_end``.

        Ranges never leave the namespace: "every key" (``b"\\0"``) and a prefix
        of ``b""`` both stop at the end of the namespace.
        """
        if prefix:
            if range_end is not None:
                raise ValueError("give either prefix=True or range_end, not both")
            return b64(prefix_range_end(self._ns + key))
        if range_end is None:
            return None
        if range_end == ALL_KEYS:
            return b64(prefix_range_end(self._ns)) if self._ns_len else b64(ALL_KEYS)
        return b64(self._ns + range_end)

    # -- requests ------------------------------------------------------------

    def range_request(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        prefix: bool = False,
        revision: int | None = None,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        sort_order: SortOrder | None = None,
        sort_target: SortTarget | None = None,
    ) -> Json:
        req: Json = {"key": self.key(key)}
        end = self.range_end(key, range_end, prefix)
        if end is not None:
            req["range_end"] = end
        if revision:
            req["revision"] = str(revision)
        if limit:
            req["limit"] = str(limit)
        if keys_only:
            req["keys_only"] = True
        if count_only:
            req["count_only"] = True
        if sort_order is not None:
            req["sort_order"] = sort_order
        if sort_target is not None:
            req["sort_target"] = sort_target
        return req

    def put_request(
        self, key: bytes, value: bytes, lease: int | None = None, prev_kv: bool = False
    ) -> Json:
        req: Json = {"key": self.key(key), "value": b64(value)}
        if lease:
            req["lease"] = str(lease)
        if prev_kv:
            req["prev_kv"] = True
        return req

    def delete_request(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        prefix: bool = False,
        prev_kv: bool = False,
    ) -> Json:
        req: Json = {"key": self.key(key)}
        end = self.range_end(key, range_end, prefix)
        if end is not None:
            req["range_end"] = end
        if prev_kv:
            req["prev_kv"] = True
        return req

    def compare(self, cmp: Compare) -> Json:
        field = _COMPARE_FIELDS[cmp.target]
        operand = cmp.operand
        req: Json = {
            "key": self.key(cmp.key),
            "result": cmp.result,
            "target": cmp.target,
            field: b64(operand) if isinstance(operand, bytes) else str(operand),
        }
        end = self.range_end(cmp.key, cmp.range_end, cmp.prefix)
        if end is not None:
            req["range_end"] = end
        return req

    def op(self, op: AnyOp) -> Json:
        if isinstance(op, PutOp):
            return {"request_put": self.put_request(op.key, op.value, op.lease, op.prev_kv)}
        if isinstance(op, RangeOp):
            return {
                "request_range": self.range_request(
                    op.key,
                    op.range_end,
                    prefix=op.prefix,
                    revision=op.revision,
                    limit=op.limit,
                    keys_only=op.keys_only,
                    count_only=op.count_only,
                    sort_order=op.sort_order,
                    sort_target=op.sort_target,
                )
            }
        if isinstance(op, DeleteOp):
            return {
                "request_delete_range": self.delete_request(
                    op.key, op.range_end, prefix=op.prefix, prev_kv=op.prev_kv
                )
            }
        if isinstance(op, TxnOp):
            return {"request_txn": self.txn_request(op.compare, op.success, op.failure)}
        raise TypeError(f"not a transaction operation: {op!r} (build them with Op.get/put/...)")

    def txn_request(
        self, compare: Iterable[Compare], success: Iterable[AnyOp], failure: Iterable[AnyOp]
    ) -> Json:
        req: Json = {}
        cmps = [self.compare(c) for c in compare]
        if cmps:
            req["compare"] = cmps
        ok = [self.op(o) for o in success]
        if ok:
            req["success"] = ok
        ko = [self.op(o) for o in failure]
        if ko:
            req["failure"] = ko
        return req

    # -- replies -------------------------------------------------------------

    def kv(self, data: Mapping[str, Any]) -> KeyValue:
        key = _b64decode(data["key"])
        if self._ns_len and key.startswith(self._ns):
            key = key[self._ns_len :]
        value = data.get("value")
        get = data.get
        return KeyValue(
            key,
            _b64decode(value) if value else b"",
            int(get("create_revision", 0)),
            int(get("mod_revision", 0)),
            int(get("version", 0)),
            int(get("lease", 0)),
        )

    def kvs(self, items: Sequence[Mapping[str, Any]] | None) -> list[KeyValue]:
        if not items:
            return []
        kv = self.kv
        return [kv(item) for item in items]

    def range_response(self, data: Mapping[str, Any], revision: int | None = None) -> RangeResponse:
        return RangeResponse(
            self.kvs(data.get("kvs")),
            int(data.get("count", 0)),
            bool(data.get("more", False)),
            header_revision(data, revision),
        )

    def put_response(self, data: Mapping[str, Any], revision: int | None = None) -> PutResponse:
        prev = data.get("prev_kv")
        return PutResponse(header_revision(data, revision), self.kv(prev) if prev else None)

    def delete_response(
        self, data: Mapping[str, Any], revision: int | None = None
    ) -> DeleteResponse:
        return DeleteResponse(
            int(data.get("deleted", 0)),
            self.kvs(data.get("prev_kvs")),
            header_revision(data, revision),
        )

    def txn_response(self, data: Mapping[str, Any], revision: int | None = None) -> TxnResponse:
        rev = header_revision(data, revision)
        responses: list[OpResponse] = []
        for item in data.get("responses") or ():
            if "response_put" in item:
                responses.append(self.put_response(item["response_put"], rev))
            elif "response_range" in item:
                responses.append(self.range_response(item["response_range"], rev))
            elif "response_delete_range" in item:
                responses.append(self.delete_response(item["response_delete_range"], rev))
            elif "response_txn" in item:
                responses.append(self.txn_response(item["response_txn"], rev))
            else:
                raise EtcdRequestError(f"unexpected transaction response from etcd: {item!r:.200}")
        return TxnResponse(bool(data.get("succeeded", False)), responses, rev)

    def events(self, items: Sequence[Mapping[str, Any]] | None) -> list[WatchEvent]:
        if not items:
            return []
        out = []
        for item in items:
            prev = item.get("prev_kv")
            out.append(
                WatchEvent(
                    "DELETE" if item.get("type") == "DELETE" else "PUT",
                    self.kv(item["kv"]),
                    self.kv(prev) if prev else None,
                )
            )
        return out


def header_revision(data: Mapping[str, Any], default: int | None = None) -> int:
    """The revision in a reply's header (nested transaction replies have none)."""
    header = data.get("header")
    if header:
        rev = header.get("revision")
        if rev is not None:
            return int(rev)
    return default or 0


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayError:
    """An error reply of etcd's JSON gateway: the gRPC status code and message."""

    code: int | None
    message: str


def _status_code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def decode_error(body: bytes | bytearray | Mapping[str, Any] | None) -> GatewayError | None:
    """The gRPC code and message of a gateway error reply, in either format (module doc).

    ``None`` when ``body`` is not an error object: empty, not JSON (a proxy's HTML
    page, etcd 3.4's ``Not Found`` text), or JSON without an error.
    """
    data: Any = body
    if isinstance(body, bytes | bytearray):
        if not body.strip():
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return None
    if not isinstance(data, Mapping):
        return None
    error = data.get("error")
    if isinstance(error, Mapping):
        # A stream error: v1 {"grpc_code", "http_code", "message", "http_status"},
        # v2 {"code", "message", "details"}.
        code = _status_code(error.get("grpc_code", error.get("code")))
        message = error.get("message")
        return GatewayError(code, str(message) if message else f"gRPC status {code}")
    code = _status_code(data.get("code"))
    message = data.get("message") or error
    if code is None and not message:
        return None
    return GatewayError(code, str(message) if message else f"gRPC status {code}")


# What an empty reply means when the request carried an auth token. The wording names
# "invalid auth token" so that the token is fetched again (see _transport._TOKEN_ERRORS).
EMPTY_REPLY_WITH_TOKEN = (
    "etcd sent an empty reply to a request with an auth token, which is how some "
    "versions answer an invalid auth token (etcd issues 15256 and 20332)"
)


def empty_reply_message(exc: BaseException | None) -> str | None:
    """``EMPTY_REPLY_WITH_TOKEN`` when ``exc`` (or its causes) is a connection etcd closed
    without any reply (urllib3's ``RemoteDisconnected``); else ``None``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, http.client.RemoteDisconnected):
            return EMPTY_REPLY_WITH_TOKEN
        inner = [a for a in getattr(exc, "args", ()) if isinstance(a, BaseException)]
        exc = inner[-1] if inner else (exc.__cause__ or exc.__context__)
    return None
