"""--rdzv-endpoint / --rdzv-conf parsing for etcd-v3 (pure: no etcd needed)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

pytest.importorskip("torch")

from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rendezvous.torchrun._options import (
    EMBEDDED_PORT_BASE,
    EMBEDDED_PORT_SPAN,
    OptionError,
    embedded_port,
    parse_options,
)

pytestmark = pytest.mark.torch


def params(endpoint: str = "127.0.0.1:2379", **config: Any) -> RendezvousParameters:
    return RendezvousParameters("etcd-v3", endpoint, "run", 1, 2, **config)


def test_defaults() -> None:
    opts = parse_options(params())
    assert [ep.url for ep in opts.endpoints] == ["http://127.0.0.1:2379"]
    assert not opts.may_embed  # an explicit endpoint is used as given
    assert opts.read_timeout == 60
    assert opts.request_timeout == 10.0
    assert opts.key_prefix == "/torch/elastic/rendezvous"
    assert opts.join_timeout is None and opts.last_call_timeout is None
    assert opts.keep_alive_interval == 5 and opts.keep_alive_max_attempt == 3


def test_every_documented_option() -> None:
    opts = parse_options(
        params(
            read_timeout="5",
            protocol="HTTPS",
            ssl_cert="/c.pem",
            ssl_cert_key="/k.pem",
            ca_cert="/ca.pem",
            join_timeout="30",
            last_call_timeout="2",
            close_timeout="3",
            heartbeat="4",
            keep_alive_interval="1",
            keep_alive_max_attempt="2",
            username="u",
            password="p",
            key_prefix="/my/prefix",
            ttl="60",
            timeout=900,  # added by torch's launcher itself
        )
    )
    assert opts.read_timeout == 5 and opts.request_timeout == 5.0
    assert opts.protocol == "https"
    assert opts.endpoints[0].url == "https://127.0.0.1:2379"
    assert (opts.ssl_cert, opts.ssl_cert_key, opts.ca_cert) == ("/c.pem", "/k.pem", "/ca.pem")
    assert opts.join_timeout == timedelta(seconds=30)
    assert opts.last_call_timeout == timedelta(seconds=2)
    assert opts.close_timeout == timedelta(seconds=3)
    assert opts.heartbeat_timeout == timedelta(seconds=4)
    assert (opts.keep_alive_interval, opts.keep_alive_max_attempt) == (1, 2)
    assert (opts.username, opts.password, opts.key_prefix, opts.ttl) == (
        "u",
        "p",
        "/my/prefix",
        60,
    )


def test_heartbeat_timeout_alias() -> None:
    assert parse_options(params(heartbeat_timeout=7)).heartbeat_timeout == timedelta(seconds=7)
    with pytest.raises(OptionError, match="heartbeat or heartbeat_timeout"):
        parse_options(params(heartbeat=1, heartbeat_timeout=2))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"store_type": "tcp"}, "unknown option.*store_type"),
        ({"last_call_timout": "1"}, "unknown option.*last_call_timout"),
        ({"read_timeout": "abc"}, "read_timeout='abc': expected an integer"),
        ({"join_timeout": "0"}, "join_timeout='0': must be at least 1"),
        ({"keep_alive_max_attempt": "-1"}, "keep_alive_max_attempt='-1'"),
        ({"keep_alive_interval": True}, "keep_alive_interval=True"),
        ({"protocol": "grpc"}, "protocol='grpc': must be http or https"),
        ({"ssl_cert_key": "/k"}, "ssl_cert_key is given without ssl_cert"),
        ({"username": "u"}, "username and password"),
        ({"key_prefix": "relative"}, "key_prefix='relative'"),
        ({"key_prefix": " "}, "key_prefix: the value is empty"),
        ({"embedded": "maybe"}, "embedded"),
    ],
)
def test_bad_options_name_the_option(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_options(params(**config))


def test_endpoint_list_and_ipv6() -> None:
    opts = parse_options(params("10.0.0.1:2379, etcd-2:2380,[::1]:2381,[fe80::1]"))
    assert [ep.url for ep in opts.endpoints] == [
        "http://10.0.0.1:2379",
        "http://etcd-2:2380",
        "http://[::1]:2381",
        "http://[fe80::1]:2379",
    ]
    assert not opts.may_embed


def test_single_endpoint_embeds_only_when_asked_and_default_port() -> None:
    opts = parse_options(params("myhost"))
    assert opts.endpoints[0].url == "http://myhost:2379"
    assert not opts.may_embed
    assert parse_options(params("myhost", embedded="true")).may_embed
    assert not parse_options(params("myhost", embedded="false")).may_embed
    assert not parse_options(params("a:1,b:2", embedded="true")).may_embed


def test_no_endpoint_means_the_jobs_own_embedded_etcd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    for endpoint in ("", "  "):
        opts = parse_options(params(endpoint))
        assert opts.endpoints[0].url == f"http://127.0.0.1:{embedded_port('run')}"
        assert opts.may_embed
    assert not parse_options(params("", embedded="false")).may_embed


def test_no_endpoint_takes_etcd_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_ENDPOINTS", "10.0.0.1:2379,10.0.0.2")
    opts = parse_options(params(""))
    assert opts.endpoint_list() == "http://10.0.0.1:2379,http://10.0.0.2:2379"
    assert not opts.may_embed
    # localhost:0 still asks for the embedded etcd; an explicit endpoint wins.
    assert parse_options(params("localhost:0")).may_embed
    assert parse_options(params("h:1")).endpoint_list() == "http://h:1"
    monkeypatch.setenv("ETCD_ENDPOINTS", "h:notaport")
    with pytest.raises(ValueError, match=r"\$ETCD_ENDPOINTS 'h:notaport'"):
        parse_options(params(""))


def test_port_zero_derives_a_stable_port_from_the_run_id() -> None:
    opts = parse_options(RendezvousParameters("etcd-v3", "localhost:0", "job-7", 1, 1))
    port = opts.endpoints[0].port
    assert port == embedded_port("job-7")
    assert EMBEDDED_PORT_BASE <= port < EMBEDDED_PORT_BASE + EMBEDDED_PORT_SPAN
    assert embedded_port("job-8") != port
    assert opts.may_embed


@pytest.mark.parametrize(
    "endpoint", ["host:notaport", "host:70000", "ftp://host:1", "host:1/path", "a:0,b:1"]
)
def test_bad_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError, match="--rdzv-endpoint"):
        parse_options(params(endpoint))
