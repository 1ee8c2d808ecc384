"""``etcd-rendezvous status``: health, version, leader and db size of each member."""

from __future__ import annotations

import json
from typing import Any

import click

from etcd_rendezvous.cli._connection import connection_options, make_client
from etcd_rendezvous.cli._output import echo_table
from etcd_rendezvous.errors import EtcdAuthError, EtcdClientError


@click.command()
@connection_options(default_timeout=2.0)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(
    endpoints: str,
    timeout: float,
    ca_cert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    as_json: bool,
) -> None:
    """Show each member's health, version, leader and db size."""
    members = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not members:
        raise click.BadParameter("no endpoint given", param_hint="--endpoints")
    rows: list[dict[str, Any]] = []
    for endpoint in members:
        row: dict[str, Any] = {"endpoint": endpoint}
        try:
            with make_client(endpoint, timeout, ca_cert, cert, key, user) as client:
                st = client.status()
            row.update(
                healthy=True,
                version=st.version,
                db_size=st.db_size,
                member_id=f"{st.member_id:x}",
                leader=f"{st.leader:x}",
                is_leader=st.leader == st.member_id,
                raft_term=st.raft_term,
            )
        except EtcdAuthError as exc:
            # It answered: etcd 3.5.30 and 3.6 refuse the status call without a login.
            hint = "" if user else " (this etcd needs a login: pass --user NAME[:PASSWORD])"
            row.update(healthy=False, refused=True, error=f"{exc}{hint}")
        except EtcdClientError as exc:
            row.update(healthy=False, error=str(exc))
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    if not all(r["healthy"] for r in rows):
        raise SystemExit(1)


def _print_table(rows: list[dict[str, Any]]) -> None:
    columns = ["ENDPOINT", "HEALTH", "VERSION", "ID", "LEADER", "DB SIZE"]
    errors = any(not r["healthy"] for r in rows)
    if errors:
        columns.append("ERROR")
    cells: list[list[object]] = []
    for r in rows:
        if r["healthy"]:
            row: list[object] = [
                r["endpoint"],
                "healthy",
                r["version"],
                r["member_id"],
                "yes" if r["is_leader"] else "no",
                _size(r["db_size"]),
            ]
            cells.append([*row, ""] if errors else row)
        else:
            health = "REFUSED" if r.get("refused") else "DOWN"
            cells.append([r["endpoint"], health, "-", "-", "-", "-", r["error"]])
    echo_table(columns, cells, right=["DB SIZE"])


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
