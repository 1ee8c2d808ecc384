"""How every etcd-facing command connects: one set of options, one way to build a client."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from etcd_rendezvous.client import EtcdClient, parse_endpoints

F = TypeVar("F", bound=Callable[..., Any])


def connection_options(*, default_timeout: float) -> Callable[[F], F]:
    """``--endpoints``, ``--timeout``, ``--ca-cert``/``--cert``/``--key`` and ``--user``."""
    options = [
        click.option(
            "--endpoints",
            envvar="ETCD_ENDPOINTS",
            required=True,
            help="Comma-separated host:port list (default: $ETCD_ENDPOINTS).",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(0.1, 300),
            default=default_timeout,
            show_default=True,
            help="Seconds to wait for each request.",
        ),
        click.option(
            "--ca-cert",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="PEM file of the CA that signs etcd's certificate (turns on https for "
            "endpoints given without a scheme).",
        ),
        click.option(
            "--cert",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="PEM client certificate, for an etcd that asks for one (--client-cert-auth).",
        ),
        click.option(
            "--key",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="PEM private key of --cert (not needed when --cert holds both).",
        ),
        click.option(
            "--user", default=None, help="user[:password]; password also from $ETCD_PASSWORD."
        ),
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def split_user(user: str | None) -> tuple[str | None, str | None]:
    """``user[:password]`` -> (user, password); the password may come from $ETCD_PASSWORD."""
    if user is None:
        return None, None
    name, sep, password = user.partition(":")
    return name, (password if sep else os.environ.get("ETCD_PASSWORD"))


def make_client(
    endpoints: str,
    timeout: float,
    ca_cert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
) -> EtcdClient:
    """An :class:`EtcdClient` for the options; a malformed endpoint is a usage error."""
    username, password = split_user(user)
    if username is not None and password is None:
        raise click.BadParameter(
            f"{user!r} has no password: give --user {username}:PASSWORD or set $ETCD_PASSWORD",
            param_hint="--user",
        )
    if not [e for e in endpoints.split(",") if e.strip()]:
        raise click.BadParameter("no endpoint given", param_hint="--endpoints")
    secure = ca_cert is not None or cert is not None
    try:
        parsed = parse_endpoints(
            endpoints,
            default_scheme="https" if secure else "http",
            credentials_hint="give them as --user NAME[:PASSWORD]",
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--endpoints") from exc
    if key is not None and cert is None:
        raise click.BadParameter("a client key needs its certificate (--cert)", param_hint="--key")
    try:
        return EtcdClient(
            [ep.url for ep in parsed],
            timeout=timeout,
            ca_cert=ca_cert,
            cert=cert,
            key=key,
            username=username,
            password=password,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
