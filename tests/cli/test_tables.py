"""`rdzv list` and `status` tables stay aligned with long run ids, node ids and errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from etcd_rendezvous.cli import main
from etcd_rendezvous.cli._output import format_table
from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.rendezvous import Rendezvous
from etcd_rendezvous.server import EtcdServer, find_free_port


def assert_aligned(
    lines: list[str], left: list[str], right: list[str], *, last: str | None = None
) -> None:
    """Every row has a cell starting under each ``left`` header and ending under each
    ``right`` header, with two spaces before it (the ``last`` column may be empty)."""
    header, rows = lines[0], lines[1:]
    assert rows, lines
    for name in left:
        start = header.index(name)
        for row in rows:
            if name == last and len(row) <= start:
                continue
            assert row[start] != " " and (start == 0 or row[start - 2 : start] == "  "), (
                f"column {name!r} not aligned:\n" + "\n".join(lines)
            )
    for name in right:
        end = header.index(name) + len(name)
        for row in rows:
            assert row[end - 1] != " " and (len(row) == end or row[end] == " "), (
                f"column {name!r} not aligned:\n" + "\n".join(lines)
            )


def test_format_table_sizes_columns_to_their_widest_cell() -> None:
    lines = format_table(
        ["NAME", "COUNT", "NOTE"],
        [["a", 1, "ok"], ["a-very-long-name-" * 4, 12345, "a long\nmessage"], ["b", 7, ""]],
        right=["COUNT"],
    )
    assert_aligned(lines, left=["NAME", "NOTE"], right=["COUNT"], last="NOTE")
    assert lines[2].endswith("12345  a long message")  # the last column is not padded
    assert lines[3] == "b" + " " * (len("a-very-long-name-" * 4) - 1) + "      7"
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        format_table(["A", "B", "C"], [["x", "y"]])


def test_rdzv_list_with_long_run_and_node_ids(etcd_server: EtcdServer, key_prefix: str) -> None:
    with EtcdClient(etcd_server.endpoint) as client:
        runs = [("short", "n0"), ("a-run-id-much-longer-than-the-old-24-columns", "node-" * 8)]
        nodes = [
            Rendezvous(client, run_id, 1, 1, node_id=node_id, key_prefix=key_prefix)
            for run_id, node_id in runs
        ]
        try:
            for node in nodes:
                node.join(timeout=20)
            result = CliRunner().invoke(
                main,
                ["rdzv", "list", "--endpoints", etcd_server.endpoint, "--key-prefix", key_prefix],
            )
        finally:
            for node in nodes:
                node.leave()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and runs[1][0] in result.stdout and runs[1][1] in result.stdout
    assert_aligned(
        lines,
        left=["RUN ID", "STATE", "LEADER", "LAST ROUND"],
        right=["ROUND", "MEMBERS", "NODES", "WAITING"],
    )


def test_status_with_a_dead_member_and_its_long_error(etcd_server: EtcdServer) -> None:
    sock = find_free_port()
    dead = f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    result = CliRunner().invoke(
        main, ["status", "--endpoints", f"{dead},{etcd_server.endpoint}", "--timeout", "0.5"]
    )
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout
    assert "DOWN" in lines[1] and "healthy" in lines[2]
    assert len(lines[1]) > 100, "the error is there in full"
    assert_aligned(
        lines,
        left=["ENDPOINT", "HEALTH", "VERSION", "ID", "LEADER", "ERROR"],
        right=["DB SIZE"],
        last="ERROR",
    )


def test_status_of_an_etcd_that_wants_a_login(etcd_binary: str) -> None:
    """3.5.30 (and 3.6) refuse the status call without a token: say so, and how to log in."""
    with EtcdServer(binary=etcd_binary, root_password="pw") as server:
        anonymous = CliRunner().invoke(main, ["status", "--endpoints", server.endpoint])
        root = CliRunner().invoke(
            main, ["status", "--endpoints", server.endpoint, "--user", "root:pw"]
        )
    assert root.exit_code == 0, root.output
    assert "healthy" in root.stdout
    if anonymous.exit_code == 0:  # 3.4.23, 3.5.1: status needs no login
        assert "healthy" in anonymous.stdout
    else:
        assert anonymous.exit_code == 1
        lines = anonymous.stdout.splitlines()
        assert "REFUSED" in lines[1], anonymous.stdout
        assert "user name is empty" in lines[1] and "pass --user NAME[:PASSWORD]" in lines[1]
