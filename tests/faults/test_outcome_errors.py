"""Which client errors mean "maybe applied": the rule the store's exactly-once relies on."""

from __future__ import annotations

import pytest

from etcd_rendezvous.client._transport import may_resend, outcome_unknown, translate_error
from etcd_rendezvous.errors import (
    EtcdOutcomeUnknownError,
    EtcdRequestError,
    EtcdUnavailableError,
)


@pytest.mark.parametrize(
    "message",
    [
        "etcdserver: request timed out",
        "etcdserver: leader changed",
        "grpc: the client connection is closing",
        "transport is closing",
        "etcdserver: server stopped",
    ],
)
def test_unavailable_replies_that_may_have_applied_a_write(message: str) -> None:
    code = 1 if "connection is closing" in message else 14
    err = translate_error("/v3/kv/txn", "http://h:1", 503, {"code": code, "message": message})
    assert isinstance(err, EtcdUnavailableError)
    assert not may_resend(err, message, idempotent=False)
    unknown = outcome_unknown(err)
    assert isinstance(unknown, EtcdOutcomeUnknownError)
    assert "may or may not have been applied" in str(unknown)
    assert unknown.__cause__ is err


@pytest.mark.parametrize("message", ["etcdserver: no leader", "etcdserver: too many requests"])
def test_unavailable_replies_that_applied_nothing_are_resent(message: str) -> None:
    err = translate_error("/v3/kv/txn", "http://h:1", 503, {"code": 14, "message": message})
    assert may_resend(err, message, idempotent=False)


def test_other_errors_are_left_alone() -> None:
    err = translate_error("/v3/kv/txn", "http://h:1", 400, {"code": 3, "message": "bad"})
    assert isinstance(err, EtcdRequestError)
    assert outcome_unknown(err) is err
