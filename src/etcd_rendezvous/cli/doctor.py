"""``etcd-rendezvous doctor``: what this machine has, and what would be used.

It also warns about etcd versions known to be a bad choice (:func:`version_warning`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import re
import sys

import click

from etcd_rendezvous import __version__
from etcd_rendezvous.errors import EtcdBinaryNotFoundError
from etcd_rendezvous.server import find_etcd_binary, list_etcd_binaries

# What to run instead of a known-bad version.
RECOMMENDED = (
    "use etcd 3.6 (the current release line, https://github.com/etcd-io/etcd/releases) "
    "or 3.5.30 or newer (e.g. Debian sid's etcd-server); point $ETCD_BINARY at it"
)


def version_warning(version: str) -> str | None:
    """Why etcd ``version`` (e.g. ``"3.5.1"``) is a bad choice, with what to use; else None.

    * before 3.4: no v3 JSON gateway under ``/v3/`` (unsupported);
    * 3.4.x: end of life since May 2026 (no more fixes, security ones included);
    * 3.5.0-3.5.2: the data inconsistency bug of etcd's 2022 advisory (a member that
      crashes mid-transaction can apply it partially), fixed in 3.5.3.
    """
    match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version.strip())
    if match is None:
        return f"etcd version {version!r} is not a release version; {RECOMMENDED}"
    major, minor, patch = (int(part) for part in match.groups())
    if (major, minor) < (3, 4):
        return (
            f"etcd {version} is not supported (etcd-rendezvous needs the v3 gateway of "
            f"etcd 3.4 or newer); {RECOMMENDED}"
        )
    if (major, minor) == (3, 4):
        return (
            f"etcd {version}: etcd 3.4 is end of life since May 2026 (no more fixes); {RECOMMENDED}"
        )
    if (major, minor) == (3, 5) and patch <= 2:
        return (
            f"etcd {version} has the data inconsistency bug of etcd 3.5.0-3.5.2 (fixed in 3.5.3) "
            f"and lacks later lease and watch fixes; {RECOMMENDED}"
        )
    return None


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
            {
                "path": b.path,
                "source": b.source,
                "version": b.version,
                "chosen": b.path == chosen,
                "warning": version_warning(b.version),
            }
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
    for b in binaries:
        warning = version_warning(b.version)
        if warning:
            click.echo(f"warning: {b.path}: {warning}")
    if problem:
        click.echo(f"problem: {problem}", err=True)
        raise SystemExit(1)
    click.echo("(* = the binary EtcdServer uses by default)")
