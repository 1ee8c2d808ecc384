"""``etcd-rendezvous rdzv``: inspect the native rendezvous (list, show, watch, close, delete)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from types import FrameType
from typing import Any, TypeVar

import click

from etcd_rendezvous.cli import _connection
from etcd_rendezvous.cli._inspect import (
    EventTranslator,
    RunEvent,
    RunSnapshot,
    UnknownRunError,
    empty_snapshot,
    list_runs,
    load_run,
)
from etcd_rendezvous.cli._output import echo_table
from etcd_rendezvous.client import EtcdClient
from etcd_rendezvous.errors import EtcdRendezvousError
from etcd_rendezvous.rendezvous import DEFAULT_KEY_PREFIX, Closed, check_run_id, close_run
from etcd_rendezvous.rendezvous._lifecycle import RunInUseError, delete_run, read_run

F = TypeVar("F", bound=Callable[..., Any])

_WATCH_TICK_S = 0.5  # how often the watch loop wakes up to notice a closed stdout


def connection_options(func: F) -> F:
    """The connection options of every etcd command, plus ``--key-prefix``."""
    func = click.option(
        "--key-prefix",
        default=DEFAULT_KEY_PREFIX,
        show_default=True,
        help="The prefix the rendezvous nodes use (Rendezvous(key_prefix=...)).",
    )(func)
    return _connection.connection_options(default_timeout=5.0)(func)


_client = _connection.make_client


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Our errors become a one-line message and exit code 1, never a traceback."""
    try:
        yield
    except EtcdRendezvousError as exc:
        raise click.ClickException(str(exc)) from exc


def _run_id(value: str) -> str:
    try:
        return check_run_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="RUN_ID") from exc


@click.group()
def rdzv() -> None:
    """Inspect and control the native rendezvous runs stored in etcd."""


# --- list ---------------------------------------------------------------------------


@rdzv.command("list")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def list_command(
    endpoints: str,
    key_prefix: str,
    timeout: float,
    ca_cert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    as_json: bool,
) -> None:
    """List the run ids under the key prefix, with round, state and member count."""
    with _errors(), _client(endpoints, timeout, ca_cert, cert, key, user) as client:
        listing = list_runs(client, key_prefix)
    if as_json:
        click.echo(json.dumps([_summary(run) for run in listing.runs], indent=2))
    elif not listing.runs:
        click.echo(f"no rendezvous runs under {key_prefix!r}")
    else:
        rows = []
        for run in listing.runs:
            s = _summary(run)
            rows.append(
                [
                    run.run_id,
                    s["round"],
                    s["state"],
                    s["members"],
                    s["nodes"],
                    s["waiting"],
                    s["leader"] or "-",
                    _ago(s["committed_at"]),
                ]
            )
        echo_table(
            ["RUN ID", "ROUND", "STATE", "MEMBERS", "NODES", "WAITING", "LEADER", "LAST ROUND"],
            rows,
            right=["ROUND", "MEMBERS", "NODES", "WAITING"],
        )
    for run in listing.runs:
        for problem in run.problems:
            click.echo(f"warning: run {run.run_id!r}: {problem.message}", err=True)
    for stray in listing.stray_keys:
        click.echo(f"warning: {stray!r} is not inside any run (foreign key?)", err=True)


def _summary(run: RunSnapshot) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "round": run.round_number,
        "state": run.state,
        "members": len(run.members),
        "participants": len(run.participants),
        "nodes": len(run.nodes),
        "waiting": len(run.by_role("waiting")),
        "spares": len(run.by_role("spare")),
        "lost": list(run.lost),
        "left": list(run.left),
        "cause": list(run.round.causes) if run.round is not None else [],
        "leader": run.leader,
        "committed_at": (run.round.time or None) if run.round is not None else None,
        "problems": [{"key": p.key, "error": p.message} for p in run.problems],
    }


def _ago(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    seconds = (datetime.now(timezone.utc) - then).total_seconds()
    if seconds < 120:
        ago = f"{seconds:.1f} s ago"
    elif seconds < 7200:
        ago = f"{seconds / 60:.0f} min ago"
    else:
        ago = f"{seconds / 3600:.1f} h ago"
    return f"{iso} ({ago})"


# --- show -----------------------------------------------------------------------------


@rdzv.command("show")
@click.argument("run_id")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show_command(
    run_id: str,
    endpoints: str,
    key_prefix: str,
    timeout: float,
    ca_cert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    as_json: bool,
) -> None:
    """Show one run: round, state, members with ranks and data, wait list, spares,
    lost members and each node's remaining lease TTL.

    Exits with 1 (after showing the rest) if a key under the run is not a valid record.
    """
    run_id = _run_id(run_id)
    with _errors(), _client(endpoints, timeout, ca_cert, cert, key, user) as client:
        snap = load_run(client, run_id, key_prefix)
    if as_json:
        click.echo(json.dumps(snap.to_json(), indent=2))
    else:
        _print_run(snap)
    if snap.problems:
        for problem in snap.problems:
            click.echo(f"error: {problem.message}", err=True)
        raise SystemExit(1)


def _ttl(value: int | None) -> str:
    if value is None:
        return "?"
    return "expired" if value < 0 else f"{value} s"


def _data(data: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(dict(data).items())) or "-"


def _print_run(snap: RunSnapshot) -> None:
    click.echo(f"rendezvous {snap.run_id}  (prefix {snap.key_prefix}, revision {snap.revision})")
    click.echo(f"state:     {snap.state}")
    if snap.round is None:
        click.echo("round:     none committed yet")
    else:
        r = snap.round
        click.echo(
            f"round:     {r.round}, committed {_ago(r.time)} by {r.leader or '?'}: "
            f"{r.reason or 'no reason given'}"
        )
        if r.causes:
            click.echo(f"cause:     {', '.join(r.causes)} (completed by {r.completion or '?'})")
    if snap.config is not None:
        c = snap.config
        click.echo(
            f"settings:  min_nodes {c.min_nodes}, max_nodes {c.max_nodes}, last call "
            f"{c.last_call_timeout:g} s, lease TTL {c.lease_ttl} s, fast quorum "
            f"{'on' if c.fast_quorum else 'off'}"
        )
    if snap.leader is not None:
        click.echo(f"leader:    {snap.leader}")
    else:
        click.echo("leader:    none (the next node to act takes over)")
    if snap.closed is not None:
        click.echo(f"closed:    yes, by {snap.closed.by or '?'} at {snap.closed.time or '?'}")
    if snap.round is not None:
        click.echo(f"members:   {len(snap.members)} in round {snap.round.round}")
        click.echo(f"  {'RANK':>4}  {'NODE':<28} {'STATE':<9} {'LEASE TTL':>9}  DATA")
        for rank, node in enumerate(snap.members):
            info = snap.nodes.get(node)
            state = info.role if info is not None else "lost"
            ttl = _ttl(info.ttl) if info is not None else "-"
            data = snap.round.data.get(node, {})
            click.echo(f"  {rank:>4}  {node:<28} {state:<9} {ttl:>9}  {_data(data)}")
    for title, role in (
        ("wait list", "waiting"),
        ("spares", "spare"),
        ("pending", "pending"),
        ("leaving", "leaving"),
    ):
        names = snap.by_role(role)
        if role in ("pending", "leaving") and not names:
            continue
        click.echo(f"{title + ':':<10} {_nodes(snap, names)}")
    lost = [n for n in snap.lost if n not in snap.left]
    click.echo(f"{'lost:':<10} {', '.join(lost) or 'none'}")
    if snap.left:
        click.echo(f"{'left:':<10} {', '.join(snap.left)}")
    if snap.status is not None:
        st = snap.status
        click.echo(
            f"status:    round {st.round}: {st.participants} participating, {st.waiting} "
            f"waiting, {st.spares} spares (published by {st.leader or '?'})"
        )
    if snap.problems:
        click.echo("problems:")
        for problem in snap.problems:
            click.echo(f"  {problem.key}: {problem.message}")


def _nodes(snap: RunSnapshot, names: tuple[str, ...]) -> str:
    if not names:
        return "none"
    parts = []
    for name in names:
        info = snap.nodes[name]
        extra = f"lease {_ttl(info.ttl)}"
        if info.data:
            extra += f", {_data(info.data)}"
        parts.append(f"{name} ({extra})")
    return ", ".join(parts)


# --- watch ----------------------------------------------------------------------------


class _Stop(Exception):
    """SIGTERM while watching: stop like Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def format_event(event: RunEvent) -> str:
    stamp = event.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
    return f"{stamp}  {event.kind:<8} {event.message}"


@rdzv.command("watch")
@click.argument("run_id")
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines (one per event).")
@click.option(
    "--wait",
    "wait_for_run",
    is_flag=True,
    help="Watch a run that has not started yet (no error when nothing exists).",
)
def watch_command(
    run_id: str,
    endpoints: str,
    key_prefix: str,
    timeout: float,
    ca_cert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    as_json: bool,
    wait_for_run: bool,
) -> None:
    """Print the run's events as they happen (Ctrl-C to stop): nodes joined, rejoined,
    left or lost, rounds committed with their cause, leader changes, closing.
    """
    run_id = _run_id(run_id)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with _errors(), _client(endpoints, timeout, ca_cert, cert, key, user) as client:
            try:
                snap = load_run(client, run_id, key_prefix, lease_ttls=False)
            except UnknownRunError:
                if not wait_for_run:
                    raise
                snap = load_run_or_empty(client, run_id, key_prefix)
            _watch(client, snap, as_json)
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_run_or_empty(client: EtcdClient, run_id: str, key_prefix: str) -> RunSnapshot:
    """The run, or an empty snapshot at the current revision (``watch --wait``)."""
    try:
        return load_run(client, run_id, key_prefix, lease_ttls=False)
    except UnknownRunError:
        revision = client.range(f"{key_prefix.rstrip('/')}/{run_id}/", count_only=True).revision
        return empty_snapshot(run_id, key_prefix, revision)


def _watch(client: EtcdClient, snap: RunSnapshot, as_json: bool) -> None:
    translator = EventTranslator(snap)
    root = f"{snap.key_prefix.rstrip('/')}/{snap.run_id}/"
    emit = _emitter(snap.run_id, as_json)
    watch = client.watch(root, prefix=True, start_revision=snap.revision + 1)
    try:
        emit(_opening(snap))
        for problem in snap.problems:
            emit(RunEvent("problem", problem.message, snap.revision, details={"key": problem.key}))
        while True:
            event = watch.next_event(timeout=_WATCH_TICK_S)
            if event is None:
                continue
            translated = translator.translate(event)
            if translated is not None:
                emit(translated)
    except (KeyboardInterrupt, _Stop):
        if not as_json:
            click.echo("stopped", err=True)
    finally:
        watch.cancel()


def _opening(snap: RunSnapshot) -> RunEvent:
    if snap.num_keys == 0:
        message = f"watching {snap.run_id!r} (not started yet) from revision {snap.revision + 1}"
    else:
        parts = [f"state {snap.state}", f"round {snap.round_number}"]
        if snap.members:
            parts.append(f"ranks {' '.join(f'{r}={n}' for r, n in enumerate(snap.members))}")
        if snap.leader:
            parts.append(f"leader {snap.leader}")
        message = f"watching {snap.run_id!r} from revision {snap.revision + 1}: " + ", ".join(parts)
    return RunEvent(
        "snapshot",
        message,
        snap.revision,
        round=snap.round_number,
        details={"state": snap.state, "members": list(snap.members), "leader": snap.leader},
    )


def _emitter(run_id: str, as_json: bool) -> Callable[[RunEvent], None]:
    def emit(event: RunEvent) -> None:
        if as_json:
            click.echo(json.dumps(event.to_json(run_id)))
        else:
            click.echo(format_event(event))

    return emit


# --- close ----------------------------------------------------------------------------


def cli_node_id() -> str:
    host = "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname())
    return f"cli@{host or 'host'}"


@rdzv.command("close")
@click.argument("run_id")
@connection_options
@click.option("--force", is_flag=True, help="Close even if nothing exists under the run yet.")
def close_command(
    run_id: str,
    endpoints: str,
    key_prefix: str,
    timeout: float,
    ca_cert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    force: bool,
) -> None:
    """Close the rendezvous for everyone: the job is over, every later join fails.

    Writes the engine's closed marker (``ctl/closed``), exactly as Rendezvous.close() does.
    """
    run_id = _run_id(run_id)
    with _errors(), _client(endpoints, timeout, ca_cert, cert, key, user) as client:
        if not force:
            try:
                load_run(client, run_id, key_prefix, lease_ttls=False)
            except UnknownRunError as exc:
                raise click.ClickException(
                    f"{exc}. To close it anyway (every later join of {run_id!r} then "
                    "fails), pass --force"
                ) from exc
        closed = close_rendezvous(client, run_id, key_prefix)
    if closed.already:
        click.echo(f"rendezvous {run_id} was already closed by {closed.by} at {closed.time or '?'}")
        return
    click.echo(
        f"closed rendezvous {run_id}: its torchrun agents (etcd-v3) stop their workers and "
        "exit, every later join fails (RendezvousClosedError)"
    )


def close_rendezvous(client: EtcdClient, run_id: str, key_prefix: str) -> Closed:
    """Close ``run_id`` as the engine does (``ctl/closed`` created once, by a txn)."""
    return close_run(client, run_id, key_prefix=key_prefix, by=cli_node_id())


# --- delete ---------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``2h``, ``7d`` (or bare seconds) -> seconds."""
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in _DURATION_UNITS else "s"
    number = raw[:-1] if raw[-1:] in _DURATION_UNITS else raw
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise click.BadParameter(
            f"{text!r}: expected a duration such as 90s, 30m, 2h or 7d",
            param_hint="--older-than",
        )
    return value * _DURATION_UNITS[unit]


def _closed_age(iso: str) -> float | None:
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - then).total_seconds()


@rdzv.command("delete")
@click.argument("run_id", required=False)
@connection_options
@click.option(
    "--older-than",
    default=None,
    metavar="DURATION",
    help="Instead of RUN_ID: delete every run closed longer ago than this (90s, 30m, 2h, 7d).",
)
@click.option("--force", is_flag=True, help="Delete RUN_ID even while nodes of it are alive.")
def delete_command(
    run_id: str | None,
    endpoints: str,
    key_prefix: str,
    timeout: float,
    ca_cert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    older_than: str | None,
    force: bool,
) -> None:
    """Delete a run's keys (its rendezvous state and its torchrun store).

    A closed run expires by itself ``ttl`` seconds after its close (default 2 h); this
    removes it now, e.g. to run a job again on its id while its last nodes' leases live.
    """
    if (run_id is None) == (older_than is None):
        raise click.UsageError("give RUN_ID or --older-than DURATION (not both)")
    with _errors(), _client(endpoints, timeout, ca_cert, cert, key, user) as client:
        if run_id is not None:
            run_id = _run_id(run_id)
            if read_run(client, run_id, key_prefix).count == 0:
                raise click.ClickException(
                    f"no rendezvous {run_id!r} under {key_prefix!r} (see: etcd-rendezvous "
                    "rdzv list)"
                )
            deleted = delete_run(client, run_id, key_prefix, force=force)
            click.echo(f"deleted rendezvous {run_id} ({deleted} keys)")
            return
        limit = parse_duration(older_than or "")
        kept = 0
        gone = []
        for run in list_runs(client, key_prefix).runs:
            age = _closed_age(run.closed.time) if run.closed is not None else None
            if age is None or age < limit:
                kept += 1
                continue
            try:
                delete_run(client, run.run_id, key_prefix)
            except RunInUseError as exc:
                click.echo(f"warning: kept {run.run_id}: {exc}", err=True)
                kept += 1
                continue
            gone.append(run.run_id)
    for name in gone:
        click.echo(f"deleted rendezvous {name}")
    click.echo(f"deleted {len(gone)} runs closed more than {older_than} ago; kept {kept}")


__all__ = ["close_rendezvous", "delete_command", "format_event", "parse_duration", "rdzv"]
