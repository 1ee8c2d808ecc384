"""``etcd-rendezvous status``: health, version, leader and db size of each member."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdClientError


@click.command()
@click.option(
    "--endpoints",
    envvar="ETCD_ENDPOINTS",
    required=True,
    help="Comma-separated host:port list (default: $ETCD_ENDPOINTS).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 300),
    default=2.0,
    show_default=True,
    help="Seconds to wait for each member.",
)
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--user", default=None, help="user[:password]; password also from $ETCD_PASSWORD.")
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
    username, password = _split_user(user)
    members = [e.strip() for e in endpoints.split(",") if e.strip()]
    if not members:
        raise click.BadParameter("no endpoint given", param_hint="--endpoints")
    rows: list[dict[str, Any]] = []
    for endpoint in members:
        row: dict[str, Any] = {"endpoint": endpoint}
        try:
            with EtcdClient(
                endpoint,
                timeout=timeout,
                ca_cert=ca_cert,
                cert=cert,
                key=key,
                username=username,
                password=password,
            ) as client:
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
        except (EtcdClientError, ValueError) as exc:
            row.update(healthy=False, error=str(exc))
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _print_table(rows)
    if not all(r["healthy"] for r in rows):
        raise SystemExit(1)


def _split_user(user: str | None) -> tuple[str | None, str | None]:
    if user is None:
        return None, None
    name, sep, password = user.partition(":")
    return name, (password if sep else os.environ.get("ETCD_PASSWORD"))


def _print_table(rows: list[dict[str, Any]]) -> None:
    click.echo(
        f"{'ENDPOINT':<24} {'HEALTH':<9} {'VERSION':<9} {'ID':<17} {'LEADER':<6} {'DB SIZE':>10}"
    )
    for r in rows:
        if r["healthy"]:
            click.echo(
                f"{r['endpoint']:<24} {'healthy':<9} {r['version']:<9} {r['member_id']:<17} "
                f"{'yes' if r['is_leader'] else 'no':<6} {_size(r['db_size']):>10}"
            )
        else:
            click.echo(f"{r['endpoint']:<24} {'DOWN':<9} {r['error']}")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
