"""``etcd-rendezvous doctor``: what this machine has, and what would be used."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import sys

import click

from etcd_rendezvous import __version__
from etcd_rendezvous.errors import EtcdBinaryNotFoundError
from etcd_rendezvous.server import find_etcd_binary, list_etcd_binaries


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(as_json: bool) -> None:
    """List every etcd binary found (and which is chosen), Python and library versions."""
    binaries = list_etcd_binaries()
    try:
        chosen: str | None = find_etcd_binary()
        problem = None
    except EtcdBinaryNotFoundError as exc:
        chosen, problem = None, str(exc)
    # find_spec does not import torch: `doctor` stays fast and side-effect free.
    torch_version = _dist_version("torch") if importlib.util.find_spec("torch") else None
    report = {
        "etcd_rendezvous": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "urllib3": _dist_version("urllib3"),
        "click": _dist_version("click"),
        "torch": torch_version,
        "etcd_binaries": [
            {"path": b.path, "source": b.source, "version": b.version, "chosen": b.path == chosen}
            for b in binaries
        ],
        "chosen_binary": chosen,
        "problem": problem,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"etcd-rendezvous {__version__}")
    click.echo(f"python          {report['python']} ({sys.executable})")
    click.echo(f"urllib3         {report['urllib3']}")
    click.echo(f"click           {report['click']}")
    missing_torch = "not installed (pip install 'etcd-rendezvous[torch]')"
    click.echo(f"torch           {torch_version or missing_torch}")
    click.echo("etcd binaries:")
    if not binaries:
        click.echo("  none found")
    for b in binaries:
        mark = "*" if b.path == chosen else " "
        click.echo(f"  {mark} {b.version or '?':<10} {b.path}  ({b.source})")
    if problem:
        click.echo(f"problem: {problem}", err=True)
        raise SystemExit(1)
    click.echo("(* = the binary EtcdServer uses by default)")
