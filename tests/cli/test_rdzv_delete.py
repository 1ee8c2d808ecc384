"""A run's life after it closed: ``rdzv delete``, expiry on a lease, starting afresh."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from click.testing import CliRunner, Result

from etcd_rendezvous.cli import main
from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import Rendezvous, RendezvousClosedError, close_run
from etcd_rendezvous.rendezvous._lifecycle import (
    expire_run,
    read_run,
    reset_if_finished,
    store_prefix,
)
from etcd_rendezvous.rendezvous._records import ClosedRecord, Keys, encode
from etcd_rendezvous.server import EtcdServer


@pytest.fixture
def client(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    with EtcdClient(etcd_server.endpoint) as c:
        yield c


def cli(etcd_server: EtcdServer, *args: str) -> Result:
    return CliRunner().invoke(main, ["rdzv", *args, "--endpoints", etcd_server.endpoint])


def finished_run(client: EtcdClient, prefix: str, run_id: str) -> None:
    """One node joins, closes and leaves: a run as a finished job leaves it."""
    with Rendezvous(client, run_id, 1, 1, key_prefix=prefix, last_call_timeout=0.1) as node:
        node.join(timeout=20)
        node.close()
    client.put(store_prefix(prefix, run_id) + "k", b"v")


def test_delete_removes_run_and_store(
    etcd_server: EtcdServer, client: EtcdClient, key_prefix: str
) -> None:
    finished_run(client, key_prefix, "done")
    assert read_run(client, "done", key_prefix).count > 1
    result = cli(etcd_server, "delete", "done", "--key-prefix", key_prefix)
    assert result.exit_code == 0, result.output
    assert "deleted rendezvous done" in result.output
    assert read_run(client, "done", key_prefix).count == 0
    again = cli(etcd_server, "delete", "done", "--key-prefix", key_prefix)
    assert again.exit_code == 1 and "no rendezvous 'done'" in again.output, again.output


def test_delete_refuses_a_live_run_without_force(
    etcd_server: EtcdServer, client: EtcdClient, key_prefix: str
) -> None:
    with Rendezvous(client, "live", 1, 1, key_prefix=key_prefix, last_call_timeout=0.1) as node:
        node.join(timeout=20)
        result = cli(etcd_server, "delete", "live", "--key-prefix", key_prefix)
        assert result.exit_code == 1, result.output
        assert "still has live nodes" in result.output and "--force" in result.output
        assert "Traceback" not in result.output
        forced = cli(etcd_server, "delete", "live", "--key-prefix", key_prefix, "--force")
        assert forced.exit_code == 0, forced.output
    assert read_run(client, "live", key_prefix).count == 0


def test_delete_older_than_only_takes_old_closed_runs(
    etcd_server: EtcdServer, client: EtcdClient, key_prefix: str
) -> None:
    finished_run(client, key_prefix, "old")
    finished_run(client, key_prefix, "new")
    long_ago = (datetime.now(timezone.utc) - timedelta(hours=3)).isoformat()
    client.put(Keys("old", key_prefix).closed, encode(ClosedRecord("someone", long_ago)))
    result = cli(etcd_server, "delete", "--older-than", "2h", "--key-prefix", key_prefix)
    assert result.exit_code == 0, result.output
    assert "deleted rendezvous old" in result.output and "kept 1" in result.output
    assert read_run(client, "old", key_prefix).count == 0
    assert read_run(client, "new", key_prefix).count > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give RUN_ID or --older-than"),
        (("x", "--older-than", "1h"), "not both"),
        (("--older-than", "soon"), "expected a duration"),
    ],
)
def test_delete_usage_errors(etcd_server: EtcdServer, args: tuple[str, ...], message: str) -> None:
    result = cli(etcd_server, "delete", *args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_expire_run_puts_the_closed_run_on_a_lease(client: EtcdClient, key_prefix: str) -> None:
    finished_run(client, key_prefix, "ttl")
    moved = expire_run(client, "ttl", 2, key_prefix)
    assert moved >= 3, moved  # config, round, closed, ... and the store key
    began = time.monotonic()
    while read_run(client, "ttl", key_prefix).count and time.monotonic() - began < 15:
        time.sleep(0.1)
    assert read_run(client, "ttl", key_prefix).count == 0, (
        f"still there {time.monotonic() - began:.1f}s after a 2 s ttl"
    )


def test_reset_if_finished_starts_afresh_or_names_the_fix(
    client: EtcdClient, key_prefix: str
) -> None:
    assert reset_if_finished(client, "never", key_prefix, wait=0) is None
    finished_run(client, key_prefix, "again")
    closed = reset_if_finished(client, "again", key_prefix, wait=0)
    assert closed is not None and closed.by
    assert read_run(client, "again", key_prefix).count == 0
    # Closed while a node of it is alive: not finished, refused with the fix.
    with Rendezvous(client, "again", 1, 1, key_prefix=key_prefix, last_call_timeout=0.1) as node:
        node.join(timeout=20)  # the id works again
        close_run(client, "again", key_prefix=key_prefix, by="test")
        began = time.monotonic()
        with pytest.raises(RendezvousClosedError, match="rdzv delete again") as info:
            reset_if_finished(client, "again", key_prefix, wait=0.5)
        assert "nodes still hold leases" in str(info.value), (
            f"{info.value} after {time.monotonic() - began:.1f}s"
        )
