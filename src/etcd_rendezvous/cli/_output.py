"""Terminal helpers shared by the commands: progress lines and error exits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import click

from etcd_rendezvous.errors import EtcdPortInUseError, EtcdRendezvousError


@contextlib.contextmanager
def progress(message: str, *, quiet: bool = False) -> Iterator[None]:
    """Show ``message...`` on stderr while the block runs, then how long it took."""
    if not quiet:
        click.echo(f"{message}...", err=True, nl=False)
    started = time.monotonic()
    try:
        yield
    except BaseException:
        if not quiet:
            click.echo(" failed", err=True)
        raise
    if not quiet:
        click.echo(f" done in {time.monotonic() - started:.2f} s", err=True)


def fail(exc: EtcdRendezvousError) -> click.ClickException:
    """Turn one of our errors into a clean CLI error (exit code 1, message on stderr)."""
    if isinstance(exc, EtcdPortInUseError):  # its advice is the library's (port=0)
        return click.ClickException(
            f"{exc.problem}; give another --port, or --port 0 to pick a free one"
        )
    return click.ClickException(str(exc))
