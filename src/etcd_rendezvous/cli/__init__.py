"""The ``etcd-rendezvous`` command line: ``serve``, ``doctor``, ``status``."""

from __future__ import annotations

import logging

import click

from etcd_rendezvous import __version__
from etcd_rendezvous.cli.demo import demo
from etcd_rendezvous.cli.doctor import doctor
from etcd_rendezvous.cli.rdzv import rdzv
from etcd_rendezvous.cli.serve import serve
from etcd_rendezvous.cli.status import status


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="etcd-rendezvous")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Run etcd for your jobs and use it as an elastic rendezvous."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


main.add_command(serve)
main.add_command(doctor)
main.add_command(status)
main.add_command(rdzv)
main.add_command(demo)

__all__ = ["main"]
