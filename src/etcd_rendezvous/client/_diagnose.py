"""Say what is wrong when etcd cannot be reached or something else answers.

"Is etcd running there?" is the right question only when nothing answers. A TLS
handshake that fails, an https-only etcd reached over http, or a web server that
is not etcd each get their own sentence, so the user knows what to change.
"""

from __future__ import annotations

import re
import socket
import ssl

from urllib3.exceptions import ProtocolError, SSLError

from etcd_rendezvous.client._endpoints import Endpoint

NOT_RUNNING = ". Is etcd running there?"

_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def summarize_reply(payload: bytes, content_type: str = "") -> str:
    """A short description of a reply that is not etcd's JSON (never a whole page)."""
    size = f"{len(payload):,} bytes"
    head = payload[:512].lstrip().lower()
    kind = content_type.split(";", maxsplit=1)[0].strip()
    if kind == "text/html" or head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        match = _TITLE.search(payload[:4096])
        title = match.group(1).decode("utf-8", "replace").strip() if match else ""
        titled = f" titled {title[:80]!r}" if title else ""
        return f"an HTML page{titled} ({size})"
    text = payload[:80].decode("utf-8", "replace")
    text = " ".join(text.split())
    more = "..." if len(payload) > 80 else ""
    return f"{(kind + ' ') if kind else ''}{text!r}{more} ({size})"


def _chain(exc: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        reason = getattr(exc, "reason", None)
        if isinstance(reason, BaseException) and reason not in seen:
            seen.append(reason)
        inner = exc.args[-1] if exc.args and isinstance(exc.args[-1], BaseException) else None
        exc = inner or exc.__cause__ or exc.__context__
    return seen


def speaks_tls(host: str, port: int, timeout: float = 1.0) -> bool | None:
    """Whether host:port speaks TLS (certificate not checked); ``None``: no connection."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    with raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return True
        except ssl.SSLError as exc:
            # A TLS alert from the server (e.g. "bad certificate": it wants one) is TLS too.
            return "alert" in str(exc).lower()
        except (OSError, ValueError):
            return False


def unreachable_advice(
    exc: BaseException | None, endpoint: Endpoint, *, client_cert: bool, probe: bool = True
) -> str:
    """The sentence that ends a "no etcd endpoint reachable" error, from the last failure.

    ``client_cert``: whether the client presented a certificate. ``probe``: when the
    server hung up (on a TLS hello, or on plain http), check with one bounded TLS
    handshake whether it speaks TLS at all.
    """
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain).lower()
    tls_failed = any(isinstance(e, ssl.SSLError | SSLError) for e in chain)
    hung_up = any(
        isinstance(e, ConnectionResetError | ProtocolError)
        or type(e).__name__ == "RemoteDisconnected"
        for e in chain
    )
    if tls_failed or (endpoint.scheme == "https" and hung_up):
        if "certificate verify failed" in text:
            return (
                ". etcd's TLS certificate is not trusted by this client: give the CA "
                "certificate that signed it (ca_cert; --ca-cert on the command line)."
            )
        plain = "wrong version number" in text or "record layer failure" in text
        if not plain and probe and "alert" not in text:
            # etcd on plain http hangs up on a TLS hello just as an mTLS etcd hangs up
            # on a client without a certificate: one handshake without tells them apart.
            plain = speaks_tls(endpoint.host, endpoint.port) is False
        if plain:
            return (
                f". {endpoint.netloc} does not speak TLS: use http://{endpoint.netloc} "
                "(an endpoint without a scheme is https when a CA or certificate is given)."
            )
        if client_cert:
            return (
                ". etcd refused this client's TLS certificate: it must be signed by a CA "
                "etcd trusts (its --trusted-ca-file) and allow client authentication."
            )
        return (
            ". etcd ended the TLS handshake: it requires a client certificate signed by "
            "its CA (cert and key; --cert/--key on the command line)."
        )
    if endpoint.scheme == "http" and hung_up and probe and speaks_tls(endpoint.host, endpoint.port):
        return (
            f". {endpoint.netloc} speaks TLS only: use https://{endpoint.netloc} "
            "with the CA certificate that signed etcd's (ca_cert; --ca-cert)."
        )
    return NOT_RUNNING


__all__ = ["NOT_RUNNING", "speaks_tls", "summarize_reply", "unreachable_advice"]
