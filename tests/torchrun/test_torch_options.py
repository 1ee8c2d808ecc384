"""--rdzv-endpoint / --rdzv-conf parsing for etcd-v3 (pure: no etcd needed)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st

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


@pytest.fixture
def tls_paths(tmp_path: Path) -> tuple[str, str, str]:
    """(cert, key, ca): files that exist (their content is not read here)."""
    paths = tuple(str(tmp_path / name) for name in ("c.pem", "k.pem", "ca.pem"))
    for path in paths:
        Path(path).write_text("x")
    return paths  # type: ignore[return-value]


def test_every_documented_option(tls_paths: tuple[str, str, str]) -> None:
    cert, key, ca = tls_paths
    opts = parse_options(
        params(
            read_timeout="5",
            protocol="HTTPS",
            ssl_cert=cert,
            ssl_cert_key=key,
            ca_cert=ca,
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
    assert (opts.ssl_cert, opts.ssl_cert_key, opts.ca_cert) == (cert, key, ca)
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
        ({"ssl_cert_key": __file__}, "ssl_cert_key is given without ssl_cert"),
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


def test_an_embedded_etcd_on_another_host_than_loopback_is_replicated() -> None:
    """host0:PORT with embedded=true, or host0:0: the agents form a replicated etcd."""
    opts = parse_options(params("host0:29500", embedded="true"))
    assert opts.may_embed and opts.replicated and opts.members == 3
    assert parse_options(params("10.0.0.7:0")).replicated
    assert parse_options(params("host0:0", members="5")).members == 5
    assert parse_options(params("host0:0", members="1")).replicated
    # one machine: the single-member sidecar, as before
    for endpoint in ("localhost:0", "127.0.0.1:0", "[::1]:0", ""):
        assert not parse_options(params(endpoint)).replicated, endpoint
    # never an explicit endpoint that was not asked for
    assert not parse_options(params("host0:29500")).replicated
    assert not parse_options(params("host0:0", embedded="false")).replicated


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ("2", r"members=2: use 1, 3 or 5"),
        ("4", r"members=4: use 1, 3 or 5"),
        ("7", r"members"),
        ("0", r"members"),
        ("three", r"members"),
    ],
)
def test_members_must_be_1_3_or_5(members: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_options(params("host0:0", members=members))


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


# torch's parse_rendezvous_endpoint rejects these (pytorch
# test/distributed/elastic/rendezvous/utils_test.py); so must we, naming the option
# and the bad part, with torch's error type (ValueError).
@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("~", r"--rdzv-endpoint '~': the host '~' contains '~'"),
        ("~:123", r"--rdzv-endpoint '~:123': the host '~' contains '~'"),
        (":123", r"--rdzv-endpoint ':123': no host before the port"),
        ("dummy.com :123", r"--rdzv-endpoint 'dummy.com :123': the host 'dummy.com ' contains ' '"),
        ("a b:1", r"--rdzv-endpoint 'a b:1': the host 'a b' contains ' '"),
        ("dummy.com:", r"--rdzv-endpoint 'dummy.com:': the port after ':' is empty"),
        ("dummy.com:abc", r"--rdzv-endpoint 'dummy.com:abc': the port 'abc' is not a number"),
        ("dummy.com:-123", r"the port '-123' is not a number from 1 to 65535"),
        ("dummy.com:-", r"the port '-' is not a number from 1 to 65535"),
        ("dummy.com:65536", r"the port '65536' is not a number from 1 to 65535"),
        ("dummy.com:70000", r"the port '70000' is not a number from 1 to 65535"),
    ],
)
def test_endpoints_torch_rejects(endpoint: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_options(params(endpoint))


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        # urllib3/urlsplit errors that named nothing ("Invalid IPv6 URL").
        ("[::1", r"--rdzv-endpoint '\[::1': an IPv6 address opened with '\[' has no closing"),
        ("http://[::1:2379", r"no closing '\]'"),
        ("[nothex]:1", r"'nothex' in brackets is not an IPv6 address"),
        # IPv6 without brackets was "invalid port".
        ("::1", r"--rdzv-endpoint '::1': .*put an IPv6 address in brackets, e.g. \[::1\]:2379"),
        ("fe80::1:2379", r"put an IPv6 address in brackets"),
        # user:pass@ was silently dropped.
        ("u:p@host:1", r"credentials .* not used; give them as --rdzv-conf username=.*password="),
        # hosts no machine has.
        ("a\x00b:1", r"the host 'a\\x00b' contains '\\x00'"),
        ("host\t1:1", r"contains '\\t'"),
        ("a..b:1", r"empty label"),
        ("300.1.1.1:1", r"'300.1.1.1' is not a valid IPv4 address"),
        ("[127.0.0.1]:1", r"brackets are for IPv6 addresses"),
        # the bad item of a list is named.
        ("h1:1,~:2", r"--rdzv-endpoint 'h1:1,~:2' \(in '~:2'\): the host '~'"),
        ("a:0,b:1", r"port 0 \(host an etcd for this run\) only works with a single endpoint"),
    ],
)
def test_malformed_endpoints_say_what_is_wrong(endpoint: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_options(params(endpoint))


@pytest.mark.parametrize("endpoint", ["dummy.com:0", "dummy-1.com:123", "[2001:db8::1]:65535"])
def test_endpoints_torch_accepts(endpoint: str) -> None:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    assert parse_options(params(endpoint)).endpoints[0].host == host


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"join_timeout": "999999999999999999"}, r"join_timeout='9+': must be from 1 to 604800"),
        ({"heartbeat": 10**18}, r"heartbeat=1000000000000000000: must be from 1 to 3600 seconds"),
        ({"read_timeout": "86401"}, r"read_timeout='86401': must be from 1 to 86400 seconds"),
        ({"keep_alive_max_attempt": "1001"}, r"must be from 1 to 1000 attempts"),
        ({"ttl": str(2**64)}, r"ttl='18446744073709551616': must be from 1 to 31536000"),
    ],
)
def test_huge_numbers_are_bounded(config: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        parse_options(params(**config))


@pytest.mark.parametrize("key", ["ca_cert", "ssl_cert"])
def test_missing_tls_file_is_an_error_even_over_http(key: str) -> None:
    with pytest.raises(OptionError, match=rf"--rdzv-conf {key}='/nope/x.pem': no such file"):
        parse_options(params("http://127.0.0.1:2379", **{key: "/nope/x.pem"}))


def test_tls_files_make_a_bare_endpoint_https(tls_paths: tuple[str, str, str]) -> None:
    cert, key, ca = tls_paths
    assert parse_options(params("h:2379", ca_cert=ca)).endpoint_list() == "https://h:2379"
    opts = parse_options(params("h:1,g:2", ssl_cert=cert, ssl_cert_key=key))
    assert opts.endpoint_list() == "https://h:1,https://g:2"


@pytest.mark.parametrize(
    "config",
    [{"protocol": "http"}, {}],
    ids=["protocol=http", "http-scheme"],
)
def test_tls_files_with_a_plain_http_endpoint_are_an_error(
    tls_paths: tuple[str, str, str], config: dict[str, Any]
) -> None:
    """Never silently unused: the user meant TLS, or gave the files by mistake."""
    ca = tls_paths[2]
    endpoint = "h:2379" if config else "http://h:2379"
    with pytest.raises(OptionError, match=r"ca_cert given, but etcd is reached over plain http"):
        parse_options(params(endpoint, ca_cert=ca, **config))


def test_missing_tls_key_file_is_an_error(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(OptionError, match=r"ssl_cert_key='/nope/k.pem': no such file"):
        parse_options(params(ssl_cert=str(cert), ssl_cert_key="/nope/k.pem"))
    with pytest.raises(OptionError, match=r"ca_cert='.*': not a file"):
        parse_options(params(ca_cert=str(tmp_path)))


# Anything torch's own parser rejects, our --rdzv-endpoint rejects too (a property,
# over strings made of the characters endpoints are made of, and the ones they are not).
_ENDPOINT_ALPHABET = "ab1209.:-_[]~ /@?#%\x00\tf:"


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(st.text(alphabet=_ENDPOINT_ALPHABET, max_size=14))
@hypothesis.example("_/")  # a trailing slash: the client takes it, torch does not
@hypothesis.example("a:1/")
def test_whatever_torch_rejects_we_reject(endpoint: str) -> None:
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    try:
        parse_rendezvous_endpoint(endpoint, default_port=2379)
    except ValueError:
        pass
    else:
        return  # torch accepts it: we may still refuse (we are stricter), no claim
    with pytest.raises(OptionError, match="--rdzv-endpoint"):
        parse_options(params(endpoint))
