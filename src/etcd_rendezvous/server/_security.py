"""Optional TLS on etcd's client URLs, and turning on etcd's authentication.

:class:`TLSConfig` says which files etcd serves https with, and which ones our own
clients (the readiness check, ``get_client()``) verify and present.
:func:`enable_root_auth` creates the ``root`` user and role and enables auth, once,
right after a fresh etcd is ready; on data where auth is already on it only checks
that the root password works.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from etcd_rendezvous.errors import EtcdAuthError, EtcdClientError, EtcdServerError

if TYPE_CHECKING:
    from etcd_rendezvous.client import EtcdClient

log = logging.getLogger(__name__)

ROOT = "root"


def _path(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.path.abspath(os.fspath(value))


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """TLS for etcd's client URLs (peers stay on plain http over loopback).

    Args:
        cert_file, key_file: the server certificate (chain) and its private key, in PEM.
            The certificate must name the host etcd listens on (e.g. an IP SAN
            ``127.0.0.1``). With ``client_cert_auth`` it must also allow client auth
            (extended key usage ``clientAuth``): etcd's own JSON gateway presents it.
        ca_file: the CA that signed the server (and client) certificates; clients verify
            the server against it. ``None``: the system's trust store.
        client_cert_auth: etcd requires a client certificate signed by ``ca_file``.
        client_cert_file, client_key_file: the certificate our clients (readiness check,
            ``get_client()``) present when ``client_cert_auth`` is on. Default: the
            server's own certificate and key.
    """

    cert_file: str
    key_file: str
    ca_file: str | None = None
    client_cert_auth: bool = False
    client_cert_file: str | None = None
    client_key_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "ca_file", "client_cert_file", "client_key_file"):
            value = getattr(self, name)
            path = _path(value)
            if path is not None and not os.path.isfile(path):
                raise EtcdServerError(f"TLSConfig.{name}: no such file: {path}")
            object.__setattr__(self, name, path)
        if self.client_cert_auth and self.ca_file is None:
            raise EtcdServerError("TLSConfig(client_cert_auth=True) needs ca_file=")
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise EtcdServerError("TLSConfig: give both client_cert_file and client_key_file")

    def etcd_args(self) -> list[str]:
        """etcd's flags for https on the client URLs."""
        args = ["--cert-file", self.cert_file, "--key-file", self.key_file]
        if self.client_cert_auth and self.ca_file is not None:
            # etcd asks every client for a certificate once it has a trusted CA file.
            args += ["--client-cert-auth", "--trusted-ca-file", self.ca_file]
        return args

    @property
    def client_cert(self) -> tuple[str, str] | None:
        """(certificate, key) our clients present, or ``None``."""
        if self.client_cert_file is not None and self.client_key_file is not None:
            return self.client_cert_file, self.client_key_file
        if self.client_cert_auth:
            return self.cert_file, self.key_file
        return None

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`~etcd_rendezvous.client.EtcdClient`."""
        kwargs: dict[str, Any] = {"ca_cert": self.ca_file}
        pair = self.client_cert
        if pair is not None:
            kwargs["cert"], kwargs["key"] = pair
        return kwargs

    def pool_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a ``urllib3.HTTPSConnectionPool`` talking to etcd."""
        kwargs: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED"}
        if self.ca_file is not None:
            kwargs["ca_certs"] = self.ca_file
        pair = self.client_cert
        if pair is not None:
            kwargs["cert_file"], kwargs["key_file"] = pair
        return kwargs


def client_kwargs(tls: TLSConfig | None, root_password: str | None) -> dict[str, Any]:
    """What a client of a server with these options needs (TLS files, root credentials)."""
    kwargs: dict[str, Any] = tls.client_kwargs() if tls is not None else {}
    if root_password is not None:
        kwargs["username"] = ROOT
        kwargs["password"] = root_password
    return kwargs


def _already_exists(exc: EtcdClientError) -> bool:
    return "already exists" in str(exc)


def enable_root_auth(anonymous: EtcdClient, root: EtcdClient, password: str, where: str) -> None:
    """Create the ``root`` user and role, then enable authentication.

    ``anonymous`` sends no credentials (auth is off on fresh data); ``root`` logs in as
    root with ``password``, the password to set. When auth is already on (a restart on old data),
    only check that the password is root's.
    """
    try:
        anonymous.user_add(ROOT, password)
    except EtcdClientError as exc:
        if _already_exists(exc):
            # A previous start stopped half-way: the user is there, the rest may not be.
            log.debug("etcd on %s: user %r already exists", where, ROOT)
        elif isinstance(exc, EtcdAuthError):
            # Auth is already enabled (a restart on old data): the password must work.
            try:
                root.members()
            except EtcdAuthError as auth_exc:
                raise EtcdServerError(
                    f"etcd on {where} already has authentication enabled and rejects "
                    f"the root_password given for user {ROOT!r}: {auth_exc}"
                ) from auth_exc
            log.info("etcd on %s: authentication was already enabled", where)
            return
        else:
            raise
    try:
        anonymous.role_add(ROOT)
    except EtcdClientError as exc:
        if not _already_exists(exc):
            raise
    anonymous.user_grant_role(ROOT, ROOT)
    anonymous.auth_enable()
    log.info("etcd on %s: authentication enabled (user %r)", where, ROOT)
