"""``etcd-rendezvous serve``: run a local etcd (one member or a cluster) until stopped."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import signal
import socket
import threading
from types import FrameType

import click

from etcd_rendezvous.cli._output import fail, progress
from etcd_rendezvous.errors import EtcdRendezvousError
from etcd_rendezvous.server import EtcdCluster, EtcdProcess, EtcdServer

_LIVENESS_CHECK_S = 0.5


@click.command()
@click.option(
    "--members",
    type=click.IntRange(1, 9),
    default=1,
    show_default=True,
    help="Number of etcd members (a local cluster when more than one).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Loopback unless you ask otherwise.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Client port of a single member (0 picks a free one).",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, writable=True),
    default=None,
    help="Keep etcd's data here (kept after exit). Default: a temporary dir.",
)
@click.option(
    "--binary",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="The etcd binary to run (default: discovered, see `etcd-rendezvous doctor`).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object with the endpoints once ready, nothing else on stdout.",
)
def serve(
    members: int, host: str, port: int, data_dir: str | None, binary: str | None, as_json: bool
) -> None:
    """Start etcd and serve until Ctrl-C or SIGTERM, then stop it and clean up.

    A member that exits on its own is reported at once, with its exit status and the
    end of its log. A cluster keeps serving (with a warning) while a quorum of its
    members runs, and exits with status 1 when the quorum is lost; a single member
    that exits ends serve with status 1.
    """
    if members > 1 and port:
        raise click.BadParameter(
            "--port applies to a single member; a cluster picks free ports", param_hint="--port"
        )
    _check_host(host)
    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    etcd: EtcdServer | EtcdCluster
    try:
        what = "etcd" if members == 1 else f"an etcd cluster of {members} members"
        try:
            if members == 1:
                etcd = EtcdServer(data_dir, binary=binary, host=host, port=port)
            else:
                etcd = EtcdCluster(members, binary=binary, host=host, data_dir=data_dir)
            with progress(f"Starting {what}", quiet=as_json):
                etcd.start()
        except EtcdRendezvousError as exc:
            raise fail(exc) from exc
        except OSError as exc:  # ports or temp dir on this host: a clean error, not a trace
            raise click.ClickException(f"could not start {what} on {host}: {exc}") from exc
        try:
            _announce(etcd, as_json)
            watcher = _MemberWatcher(etcd)
            while not stop_requested.wait(_LIVENESS_CHECK_S):
                watcher.check()
        finally:
            try:
                with progress("Stopping etcd", quiet=as_json):
                    etcd.stop()
            except EtcdRendezvousError as exc:
                raise fail(exc) from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_host(host: str) -> None:
    """``--host`` must name an address of this machine (etcd listens on it)."""
    bare = host.strip("[]")
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(bare).is_unspecified:
            raise click.BadParameter(
                f"{host!r} means every address, but etcd also tells its clients this "
                "address (its advertised URL), where none of them can reach it: give one "
                "address of this machine, e.g. 127.0.0.1 (this machine only) or the address "
                "other hosts reach it at (see `ip -brief address`)",
                param_hint="--host",
            )
    try:
        infos = socket.getaddrinfo(bare, 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise click.BadParameter(
            f"cannot resolve {host!r} ({exc}); give an address of this machine, "
            "e.g. 127.0.0.1 (this machine only) or the address of one of its interfaces",
            param_hint="--host",
        ) from exc
    errors: list[str] = []
    for family, type_, proto, _, sockaddr in infos:
        with socket.socket(family, type_, proto) as sock:
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
                continue
            return
    raise click.BadParameter(
        f"{host!r} is not an address of this machine, so etcd cannot listen on it "
        f"({'; '.join(errors)}); serve runs etcd here: give 127.0.0.1 (this machine only) "
        "or the address of one of its interfaces (see `ip -brief address`)",
        param_hint="--host",
    )


def _exit_status(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class _MemberWatcher:
    """Notices members that exit on their own; reports each once; decides whether to go on."""

    def __init__(self, etcd: EtcdServer | EtcdCluster) -> None:
        self._etcd = etcd
        self._reported: set[int] = set()
        self._warned_dead = 0

    def _processes(self) -> list[tuple[str, EtcdProcess | None]]:
        if isinstance(self._etcd, EtcdServer):
            return [("etcd", self._etcd.process)]
        return [(f"etcd member {m.name}", m.process) for m in self._etcd.members]

    def check(self) -> None:
        """Report new deaths; raise ClickException when serving cannot go on."""
        processes = self._processes()
        for what, proc in processes:
            if proc is None or proc.is_running or proc.pid in self._reported:
                continue
            self._reported.add(proc.pid)
            tail = proc.log_tail(lines=10)
            log_lines = f"; the end of its log:\n{_indent(tail)}" if tail else "; its log is empty"
            click.echo(
                f"ERROR: {what} (pid {proc.pid}) {_exit_status(proc.returncode)}{log_lines}",
                err=True,
            )
        running = sum(1 for _, proc in processes if proc is not None and proc.is_running)
        if isinstance(self._etcd, EtcdServer):
            if running == 0:
                raise click.ClickException("etcd exited unexpectedly (see above); stopping")
            return
        total = len(processes)
        quorum = total // 2 + 1
        dead = total - running
        if running < quorum:
            raise click.ClickException(
                f"the etcd cluster lost its quorum: {running} of {total} members running, "
                f"{quorum} needed; stopping"
            )
        if dead and dead > self._warned_dead:
            self._warned_dead = dead
            click.echo(
                f"WARNING: the etcd cluster keeps serving on {running} of {total} members; "
                f"it needs {quorum}, so {running - quorum + 1} more lost member(s) stop it",
                err=True,
            )


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


def _endpoints(etcd: EtcdServer | EtcdCluster) -> list[str]:
    return [etcd.endpoint] if isinstance(etcd, EtcdServer) else list(etcd.endpoints)


def _announce(etcd: EtcdServer | EtcdCluster, as_json: bool) -> None:
    endpoints = _endpoints(etcd)
    joined = ",".join(endpoints)
    if as_json:
        info = {
            "endpoints": endpoints,
            "urls": [f"http://{e}" for e in endpoints],
            "version": etcd.version,
            "data_dir": etcd.data_dir,
        }
        click.echo(json.dumps(info), nl=True)
        return
    click.echo(f"etcd {etcd.version} is serving on {joined}")
    click.echo(f"export ETCD_ENDPOINTS={joined}")
    click.echo("Press Ctrl-C to stop.", err=True)
