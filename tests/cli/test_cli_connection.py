"""The connection options every etcd command shares: usage errors, never a traceback.

Pure: a malformed option fails before any request, so no etcd is needed.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from etcd_rendezvous.cli import main

COMMANDS = [["status"], ["rdzv", "list"], ["rdzv", "show", "run"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("~:123", "endpoint '~:123': the host '~' contains '~'"),
        ("dummy.com:", "endpoint 'dummy.com:': the port after ':' is empty"),
        ("a b:1", "the host 'a b' contains ' '"),
        ("[::1", "has no closing ']'"),
        ("::1", "put an IPv6 address in brackets"),
        ("u:pw@h:1", "give them as --user NAME[:PASSWORD]"),
        ("h:0", "port 0 is not a port etcd can listen on"),
    ],
)
def test_bad_endpoint_is_a_usage_error(command: list[str], endpoint: str, message: str) -> None:
    result = CliRunner().invoke(main, [*command, "--endpoints", endpoint])
    assert result.exit_code == 2, result.output
    assert "Invalid value for --endpoints" in result.output
    assert message in result.output
    assert isinstance(result.exception, SystemExit), "a usage error, not a traceback"


def test_missing_tls_file_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["status", "--endpoints", "h:1", "--ca-cert", "/nope.pem"])
    assert result.exit_code == 2
    assert "'/nope.pem' does not exist" in result.output


def test_user_without_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ETCD_PASSWORD", raising=False)
    result = CliRunner().invoke(main, ["rdzv", "list", "--endpoints", "h:1", "--user", "bob"])
    assert result.exit_code == 2
    assert "give --user bob:PASSWORD or set $ETCD_PASSWORD" in result.output


def test_tls_options_have_help() -> None:
    result = CliRunner().invoke(main, ["status", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--ca-cert FILE PEM file of the CA that signs etcd's certificate" in text
    assert "--cert FILE PEM client certificate" in text
    assert "--key FILE PEM private key of --cert" in text
