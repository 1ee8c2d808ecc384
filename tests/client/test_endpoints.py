"""Endpoint parsing (strict, every mistake named) and the client's TLS file checks.

Pure: no etcd needed. torch's own cases (pytorch
test/distributed/elastic/rendezvous/utils_test.py, ``parse_rendezvous_endpoint``) are
all rejected here too, with our message and torch's error type (``ValueError``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from etcd_rendezvous.client import EtcdClient, parse_endpoints
from etcd_rendezvous.client._endpoints import Endpoint, EndpointError, parse_endpoint

HOST_HINT = "a host is a DNS name"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # torch's utils_test.py: invalid host names...
        ("~", rf"endpoint '~': the host '~' contains '~'; {HOST_HINT}"),
        ("~:123", r"endpoint '~:123': the host '~' contains '~'"),
        ("dummy.com :123", r"endpoint 'dummy.com :123': the host 'dummy.com ' contains ' '"),
        (":123", r"endpoint ':123': no host before the port"),
        # ...and invalid ports.
        ("dummy.com:", r"endpoint 'dummy.com:': the port after ':' is empty"),
        ("dummy.com:abc", r"the port 'abc' is not a number from 1 to 65535"),
        ("dummy.com:-123", r"the port '-123' is not a number from 1 to 65535"),
        ("dummy.com:-", r"the port '-' is not a number from 1 to 65535"),
        ("dummy.com:65536", r"the port '65536' is not a number from 1 to 65535"),
        ("dummy.com:70000", r"the port '70000' is not a number from 1 to 65535"),
        # issue 10 / 12: what we accepted and torch did not, or named nothing.
        ("a b:1", r"the host 'a b' contains ' '"),
        ("a\x00b:1", r"the host 'a\\x00b' contains '\\x00'"),
        ("[::1", r"endpoint '\[::1': an IPv6 address opened with '\[' has no closing '\]'"),
        ("[::1]x", r"unexpected 'x' after '\]'"),
        ("[::g]:1", r"'::g' in brackets is not an IPv6 address"),
        ("::1", r"more than one ':'; put an IPv6 address in brackets, e.g. \[::1\]:2379"),
        ("2001:db8::1:2379", r"put an IPv6 address in brackets"),
        ("http://user:pw@h:1", r"credentials in the endpoint .* pass username= and password="),
        ("h:0", r"port 0 is not a port etcd can listen on"),
        ("h:1\u0661", r"the port '1\u0661' is not a number"),  # a non-ASCII digit
        ("ftp://h:1", r"the scheme must be http or https, got 'ftp'"),
        ("http://h:1/v3", r"expected host:port, got a path"),
        ("h:1?x=1", r"expected host:port, got a path"),
        ("256.0.0.1", r"'256.0.0.1' is not a valid IPv4 address"),
        ("a..b", r"empty label"),
        ("-a.b", r"starts or ends with '-'"),
        ("[10.0.0.1]:1", r"brackets are for IPv6 addresses; write 10.0.0.1 without them"),
    ],
)
def test_malformed_endpoint_is_named_with_the_bad_part(text: str, message: str) -> None:
    with pytest.raises(EndpointError, match=message) as info:
        parse_endpoints(text)
    assert isinstance(info.value, ValueError), "torch's error type"
    assert info.value.endpoint == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dummy.com:123", Endpoint("http", "dummy.com", 123)),
        ("dummy-1.com:65535", Endpoint("http", "dummy-1.com", 65535)),
        ("123.123.123.123", Endpoint("http", "123.123.123.123", 2379)),
        ("[2001:db8::1]:123", Endpoint("http", "2001:db8::1", 123)),
        ("[2001:db8::1]", Endpoint("http", "2001:db8::1", 2379)),
        ("  etcd_1:5  ", Endpoint("http", "etcd_1", 5)),
        ("HTTPS://Etcd.Example.COM.:7/", Endpoint("https", "etcd.example.com.", 7)),
        ("[fe80::1%eth0]:5", Endpoint("http", "fe80::1%eth0", 5)),
    ],
)
def test_good_endpoints(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


def test_port_zero_only_when_the_caller_allows_it() -> None:
    assert parse_endpoint("localhost:0", allow_port_zero=True).port == 0
    with pytest.raises(EndpointError, match="port 0"):
        parse_endpoint("localhost:0")


def test_the_bad_item_of_a_list_is_named() -> None:
    with pytest.raises(EndpointError, match=r"^endpoint ' ~:2': the host '~'") as info:
        parse_endpoints("h:1, ~:2")
    assert info.value.problem.startswith("the host '~'")


def test_the_client_rejects_malformed_endpoints_at_once() -> None:
    for text in ("~:123", "dummy.com:", "u:p@h:1"):
        with pytest.raises(ValueError, match=f"endpoint '{text}'"):
            EtcdClient(text)


@pytest.mark.parametrize("arg", ["ca_cert", "cert"])
def test_missing_tls_file_is_an_error_even_over_http(arg: str) -> None:
    with pytest.raises(ValueError, match=rf"{arg}='/nope/x.pem': no such file"):
        EtcdClient("http://127.0.0.1:2379", **{arg: "/nope/x.pem"})  # type: ignore[arg-type]


def test_missing_or_directory_key_file_is_an_error(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ValueError, match=r"key='/nope/k.pem': no such file \(the client"):
        EtcdClient("http://127.0.0.1:2379", cert=str(cert), key="/nope/k.pem")
    with pytest.raises(ValueError, match=r"ca_cert='.*': not a file"):
        EtcdClient("http://127.0.0.1:2379", ca_cert=str(tmp_path))
