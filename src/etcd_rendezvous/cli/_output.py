"""Terminal helpers shared by the commands: progress lines, tables and error exits."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

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


def format_table(
    columns: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[str] = ()
) -> list[str]:
    """The lines of a table whose columns are as wide as their widest cell.

    ``columns`` are the headers; a header in ``right`` is right-aligned (numbers).
    Columns are two spaces apart; the last one is not padded, so a long value there
    (an error message) never pushes the others. Line breaks inside a cell become spaces.
    """
    cells = [[" ".join(str(value).split()) for value in row] for row in rows]
    for row in cells:
        if len(row) != len(columns):
            raise ValueError(f"a table row has {len(row)} cells for {len(columns)} columns")
    widths = [
        max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(columns)
    ]
    last = len(columns) - 1

    def line(values: Sequence[str]) -> str:
        out = []
        for i, (value, header) in enumerate(zip(values, columns, strict=True)):
            if header in right:
                out.append(value.rjust(widths[i]))
            else:
                out.append(value if i == last else value.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return [line(list(columns)), *(line(row) for row in cells)]


def echo_table(
    columns: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[str] = ()
) -> None:
    """Print :func:`format_table` to stdout."""
    for text in format_table(columns, rows, right=right):
        click.echo(text)
