"""Suite-wide fixtures: every etcd-facing test runs on every installed etcd binary.

The fixtures themselves (``etcd_server``, ``etcd_client``, ``etcd_cluster``) come from
the package's pytest plugin; here ``etcd_binary`` is overridden to be parametrized
over :func:`list_etcd_binaries` (or just ``--etcd-binary`` when it is given).
Session scope: servers start once per binary.

At the end of the session, any etcd process this interpreter started and that is
still running fails the run (and is stopped), so leaks are noticed, not inherited.

The session also gets a private temp root (``TMPDIR`` and ``tempfile.tempdir``, so
every subprocess, torchrun agent and etcd of the suite uses it too). At the end the
dirs of dead owners in it are removed, as the next start would; any etcd temp dir
still left (a server never stopped, an etcd still running, a dir without an owner
marker) fails the run; then the whole root is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.server import (
    EtcdBinary,
    EtcdServer,
    _tempdirs,
    find_etcd_binary,
    list_etcd_binaries,
)
from etcd_rendezvous.server._binary import etcd_version
from etcd_rendezvous.server._process import live_processes


def _binaries(config: pytest.Config) -> list[EtcdBinary]:
    explicit = config.getoption("--etcd-binary")
    if explicit:
        path = find_etcd_binary(explicit)
        return [EtcdBinary(path=path, source="--etcd-binary", version=etcd_version(path))]
    return list_etcd_binaries()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say in the session header which etcd binaries the suite runs against."""
    try:
        binaries = _binaries(config)
    except Exception as exc:  # the fixtures report it as the failure it is
        return [f"etcd binaries: none usable ({exc})"]
    if not binaries:
        return ["etcd binaries: none found (etcd-facing tests will fail; see `doctor`)"]
    lines = ["etcd binaries (each etcd-facing test runs once per binary):"]
    lines += [
        f"  {test_id}: {b.path} ({b.source})"
        for test_id, b in zip(_ids(binaries), binaries, strict=True)
    ]
    return lines


def _ids(binaries: list[EtcdBinary]) -> list[str]:
    ids: list[str] = []
    for binary in binaries:
        base = f"etcd-{binary.version}"
        ids.append(base if base not in ids else f"{base}-{binary.source}")
    return ids


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Parametrize the session-scoped `etcd_binary` fixture (defined below) directly, so
    # tests using any etcd fixture are grouped per binary and servers start once each.
    if "etcd_binary" in metafunc.fixturenames:
        binaries = _binaries(metafunc.config)
        if not binaries:
            return  # the fixture falls back to find_etcd_binary(), which explains why not
        metafunc.parametrize(
            "etcd_binary",
            [b.path for b in binaries],
            ids=_ids(binaries),
            scope="session",
            indirect=True,
        )


@pytest.fixture(scope="session")
def etcd_binary(request: pytest.FixtureRequest) -> str:
    param: Any = getattr(request, "param", None)
    if param is not None:
        return str(param)
    try:
        return find_etcd_binary(request.config.getoption("--etcd-binary"))
    except Exception as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)  # outside the except: printed once, not chained


@pytest.fixture
def key_prefix(etcd_server: EtcdServer) -> Iterator[str]:
    """A fresh rendezvous ``key_prefix``; its keys and its store's are deleted afterwards."""
    prefix = f"/pytest-rdzv-{uuid.uuid4().hex}"
    yield prefix
    with EtcdClient(etcd_server.endpoint) as client:
        client.delete(prefix + "/", prefix=True)
        client.delete(prefix + "-store/", prefix=True)


_SUITE_TEMP_ROOT = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    outer = tempfile.gettempdir()
    # Named and marked like the package's own temp dirs: if this session is SIGKILLed,
    # the next start of any EtcdServer removes the whole root.
    root = _tempdirs.make_temp_dir(f"{_tempdirs.PREFIX}pytest-")
    config.stash[_SUITE_TEMP_ROOT] = root
    # pytest's own tmp_path dirs stay where they were (and keep its retention rules).
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", outer)
    os.environ["TMPDIR"] = root
    tempfile.tempdir = root


def _etcd_temp_dirs_left(root: str) -> list[str]:
    """Describe the etcd temp dirs under ``root`` (the suite's), one line each."""
    lines = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.startswith(_tempdirs.PREFIX) or not os.path.isdir(path):
            continue
        if name.startswith(f"{_tempdirs.PREFIX}locks-"):
            continue  # the embedded election's lock files (torchrun/_embedded.py), not etcd data
        owner = _tempdirs.read_owner(path)
        if owner is None:
            who = "no owner marker"
        else:
            state = "dead" if _tempdirs.owner_is_dead(owner) else "alive"
            who = f"owner pid {owner.pid} ({state})"
        size = 0
        for parent, _, files in os.walk(path):
            for file in files:
                with contextlib.suppress(OSError):
                    size += os.path.getsize(os.path.join(parent, file))
        lines.append(f"{path}: {who}, {size / 1e6:.0f} MB")
    return lines


def _report(session: pytest.Session, message: str) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(message, red=True, bold=True)
    else:  # pragma: no cover
        os.write(2, (message + "\n").encode())
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = live_processes()
    if leaked:
        descriptions = [f"pid {p.pid}: {' '.join(p.argv[:3])} ..." for p in leaked]
        for proc in leaked:
            proc.kill()
        _report(
            session,
            f"{len(leaked)} etcd process(es) started by the test suite were still running at "
            "the end (now killed):\n  " + "\n  ".join(descriptions),
        )
    root = session.config.stash.get(_SUITE_TEMP_ROOT, None)
    if root is None or not os.path.isdir(root):
        return
    try:
        stale = _tempdirs.remove_stale_dirs(root)
        left = _etcd_temp_dirs_left(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if left:
        _report(
            session,
            f"the test suite left {len(left)} etcd temp dir(s) behind besides the "
            f"{len(stale)} of dead parents (all now removed):\n  " + "\n  ".join(left),
        )
