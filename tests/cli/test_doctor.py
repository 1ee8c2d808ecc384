"""`etcd-rendezvous doctor` warns about known-bad etcd versions and says what to use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from etcd_rendezvous.cli import main
from etcd_rendezvous.cli.doctor import version_warning
from etcd_rendezvous.server import etcd_version


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("3.4.23", "end of life since May 2026"),
        ("3.4.0", "end of life since May 2026"),
        ("3.5.0", "data inconsistency bug"),
        ("3.5.1", "data inconsistency bug"),
        ("3.5.2", "data inconsistency bug"),
        ("3.3.27", "not supported"),
        ("2.3.8", "not supported"),
        ("main", "not a release version"),
    ],
)
def test_known_bad_versions_warn_and_say_what_to_use(version: str, expected: str) -> None:
    warning = version_warning(version)
    assert warning is not None and expected in warning, warning
    assert version in warning
    assert "use etcd 3.6" in warning and "3.5.30 or newer" in warning


@pytest.mark.parametrize("version", ["3.5.3", "3.5.30", "3.6.0", "3.6.16", "3.7.3", "v3.6.1"])
def test_good_versions_do_not_warn(version: str) -> None:
    assert version_warning(version) is None


def _fake_version(path: Path, version: str) -> str:
    """A script answering `--version` like etcd does (doctor only asks for the version)."""
    path.write_text(f'#!/bin/sh\necho "etcd Version: {version}"\n')
    path.chmod(0o755)
    return str(path)


def test_doctor_prints_a_warning_per_bad_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _fake_version(tmp_path / "etcd-old", "3.4.99")
    buggy = _fake_version(tmp_path / "etcd-buggy", "3.5.2")
    fine = _fake_version(tmp_path / "etcd-fine", "3.5.30")
    monkeypatch.setenv("ETCD_EXTRA_BINARIES", os.pathsep.join([old, buggy, fine]))
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert any(old in w and "end of life" in w for w in warnings), result.output
    assert any(buggy in w and "data inconsistency" in w for w in warnings), result.output
    assert not any(fine in w for w in warnings), result.output
    report = json.loads(CliRunner().invoke(main, ["doctor", "--json"]).output)
    by_path = {b["path"]: b for b in report["etcd_binaries"]}
    assert "end of life" in by_path[old]["warning"]
    assert "data inconsistency" in by_path[buggy]["warning"]
    assert by_path[fine]["warning"] is None
    assert not by_path[fine]["chosen"]  # extra binaries are listed, never the default


def test_doctor_on_the_real_binary(etcd_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ETCD_EXTRA_BINARIES", etcd_binary)
    report = json.loads(CliRunner().invoke(main, ["doctor", "--json"]).output)
    (entry,) = [
        b
        for b in report["etcd_binaries"]
        if os.path.realpath(b["path"]) == os.path.realpath(etcd_binary)
    ]
    assert entry["version"] == etcd_version(etcd_binary)
    assert entry["warning"] == version_warning(entry["version"])
