"""``etcd-rendezvous serve``: run a local etcd (one member or a cluster) until stopped."""

from __future__ import annotations

import json
import signal
import threading
from types import FrameType

import click

from etcd_rendezvous.cli._output import fail, progress
from etcd_rendezvous.errors import EtcdRendezvousError
from etcd_rendezvous.server import EtcdCluster, EtcdServer

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
    """Start etcd and serve until Ctrl-C or SIGTERM, then stop it and clean up."""
    if members > 1 and port:
        raise click.BadParameter(
            "--port applies to a single member; a cluster picks free ports", param_hint="--port"
        )
    stop_requested = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    etcd: EtcdServer | EtcdCluster
    try:
        if members == 1:
            etcd = EtcdServer(data_dir, binary=binary, host=host, port=port)
        else:
            etcd = EtcdCluster(members, binary=binary, host=host, data_dir=data_dir)
        what = "etcd" if members == 1 else f"an etcd cluster of {members} members"
        try:
            with progress(f"Starting {what}", quiet=as_json):
                etcd.start()
        except EtcdRendezvousError as exc:
            raise fail(exc) from exc
        try:
            _announce(etcd, as_json)
            while not stop_requested.wait(_LIVENESS_CHECK_S):
                if not _alive(etcd):
                    raise click.ClickException("etcd exited unexpectedly; see its log above")
        finally:
            with progress("Stopping etcd", quiet=as_json):
                etcd.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _endpoints(etcd: EtcdServer | EtcdCluster) -> list[str]:
    return [etcd.endpoint] if isinstance(etcd, EtcdServer) else list(etcd.endpoints)


def _alive(etcd: EtcdServer | EtcdCluster) -> bool:
    if isinstance(etcd, EtcdServer):
        return etcd.is_running
    return any(member.is_running for member in etcd.members)


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
