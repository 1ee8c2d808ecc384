"""The exception hierarchy: one root, translated once at each boundary, cause kept.

Every error raised by this package derives from :class:`EtcdRendezvousError`.
Messages say what failed, against which endpoint/key, and what the user can do.
"""

from __future__ import annotations


class EtcdRendezvousError(Exception):
    """Root of every error raised by etcd-rendezvous."""


# --- running etcd -----------------------------------------------------------


class EtcdServerError(EtcdRendezvousError):
    """Starting, checking or stopping a local etcd process failed."""


class EtcdBinaryNotFoundError(EtcdServerError):
    """No etcd binary was found; the message lists every place that was tried."""


class EtcdStartError(EtcdServerError):
    """etcd did not become ready (it exited, or the deadline passed).

    ``returncode`` is the child's exit code when it exited, ``log_tail`` the
    last lines it wrote.
    """

    def __init__(self, message: str, *, returncode: int | None = None, log_tail: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log_tail = log_tail


class EtcdPortInUseError(EtcdStartError):
    """A port asked for explicitly is already taken.

    ``problem`` says by what ("port 2379 on 127.0.0.1 is already in use by an etcd
    (3.5.1)"); the message adds the library's advice (``port=0``), and each layer
    (CLI, torchrun) can phrase its own from ``problem``.
    """

    def __init__(self, problem: str, *, host: str, port: int, advice: str) -> None:
        super().__init__(f"{problem}; {advice}")
        self.problem = problem
        self.host = host
        self.port = port


# --- talking to etcd ----------------------------------------------------------


class EtcdClientError(EtcdRendezvousError):
    """A request to etcd failed.

    ``endpoint`` is the member that answered (or failed to), ``key`` the key the
    request was about, when there was one.
    """

    def __init__(
        self, message: str, *, endpoint: str | None = None, key: bytes | str | None = None
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.key = key


class EtcdUnavailableError(EtcdClientError):
    """No endpoint could be reached (connection refused, reset, no leader)."""


class EtcdOutcomeUnknownError(EtcdUnavailableError):
    """A write may or may not have been applied, and was not resent.

    The request may have reached etcd before the connection broke, or etcd
    itself gave up waiting for it ("request timed out", "leader changed",
    "transport is closing"): the write can still be committed. Read the data
    back to learn the outcome. (An :class:`EtcdUnavailableError` that is not
    this subclass means nothing was applied: etcd refused, or was never
    reached.)
    """


class EtcdTimeoutError(EtcdClientError):
    """A request did not complete in time; for a write its outcome is unknown."""


class EtcdAuthError(EtcdClientError):
    """Authentication failed, or the user lacks permission."""


class EtcdCompactedError(EtcdClientError):
    """A watch or read asked for a revision that etcd has already compacted."""

    def __init__(
        self,
        message: str,
        *,
        compact_revision: int,
        endpoint: str | None = None,
        key: bytes | str | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, key=key)
        self.compact_revision = compact_revision


class EtcdLeaseNotFoundError(EtcdClientError):
    """The lease does not exist (it expired or was revoked)."""


class EtcdLeaseLostError(EtcdClientError):
    """A kept-alive lease was lost: it expired before a keep-alive reached etcd."""


class EtcdWatchError(EtcdClientError):
    """A watch ended and cannot be resumed (cancelled by the server, or gave up)."""


class EtcdRequestError(EtcdClientError):
    """etcd rejected the request (bad argument, too large, unexpected reply).

    ``code`` is the gRPC status code from the gateway, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        endpoint: str | None = None,
        key: bytes | str | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, key=key)
        self.code = code


__all__ = [
    "EtcdAuthError",
    "EtcdBinaryNotFoundError",
    "EtcdClientError",
    "EtcdCompactedError",
    "EtcdLeaseLostError",
    "EtcdLeaseNotFoundError",
    "EtcdOutcomeUnknownError",
    "EtcdPortInUseError",
    "EtcdRendezvousError",
    "EtcdRequestError",
    "EtcdServerError",
    "EtcdStartError",
    "EtcdTimeoutError",
    "EtcdUnavailableError",
    "EtcdWatchError",
]
