"""The README's Python snippets run as written and pass `mypy --strict`.

Each ```python block of README.md runs in a fresh interpreter (in a scratch directory
holding the PEM files the TLS snippet names); a block that defines pytest tests runs
under pytest with the package's plugin. A block preceded by
``<!-- readme-test: type-checked only, not run (why) -->`` is only type-checked;
``<!-- readme-test: shown only (why) -->`` marks the test bed's own API (tests/, not the
package), neither run nor type-checked here: its own tests run it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etcd_rendezvous.pytest_plugin import TLSFiles

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(
    r"(?P<marker><!-- readme-test: [^\n]*-->\n)?```python\n(?P<code>.*?)^```", re.S | re.M
)


@dataclasses.dataclass(frozen=True)
class Snippet:
    line: int
    code: str
    run: bool

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def snippets() -> list[Snippet]:
    text = README.read_text()
    return [
        Snippet(
            text.count("\n", 0, m.start("code")) + 1,
            m.group("code"),
            m.group("marker") is None,
        )
        for m in _BLOCK.finditer(text)
        # The test bed's own API (tests/multihost), not the package's: it needs root.
        if "shown only" not in (m.group("marker") or "")
    ]


SNIPPETS = snippets()


def test_the_readme_has_snippets_and_runs_almost_all() -> None:
    assert len(SNIPPETS) >= 4
    skipped = [s.id for s in SNIPPETS if not s.run]
    assert len(skipped) <= 1, f"only the rendezvous example may skip running: {skipped}"


@pytest.fixture
def scratch(tmp_path: Path, etcd_tls_files: TLSFiles) -> Path:
    """A working directory with the files the snippets name."""
    shutil.copy(etcd_tls_files.server_cert, tmp_path / "server.pem")
    shutil.copy(etcd_tls_files.server_key, tmp_path / "server-key.pem")
    shutil.copy(etcd_tls_files.ca, tmp_path / "ca.pem")
    return tmp_path


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parent.parent / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else "")}


@pytest.mark.slow
@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.run], ids=lambda s: s.id)
def test_readme_snippet_runs(snippet: Snippet, scratch: Path) -> None:
    defines_tests = re.search(r"^def test_", snippet.code, re.M) is not None
    name = "test_readme_snippet.py" if defines_tests else "readme_snippet.py"
    (scratch / name).write_text(snippet.code)
    if defines_tests:
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name]
    else:
        argv = [sys.executable, name]
    started = time.monotonic()
    result = subprocess.run(
        argv, cwd=scratch, env=_env(), capture_output=True, text=True, timeout=120, check=False
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, (
        f"{snippet.id} failed (rc={result.returncode}, {elapsed:.1f} s):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    if defines_tests:
        assert "1 passed" in result.stdout, result.stdout


@pytest.mark.slow
def test_readme_snippets_pass_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    files = []
    for i, snippet in enumerate(SNIPPETS):
        path = tmp_path / f"readme_snippet_{i}.py"
        path.write_text(snippet.code)
        files.append(str(path))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            os.devnull,
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            *files,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = {str(tmp_path / f"readme_snippet_{i}.py"): s.line - 1 for i, s in enumerate(SNIPPETS)}

    def in_readme(line: str) -> str:  # readme_snippet_0.py:7: error -> README.md:53: error
        path, _, rest = line.partition(":")
        number, _, message = rest.partition(":")
        if path in lines and number.isdigit():
            return f"README.md:{lines[path] + int(number)}:{message}"
        return line

    report = "\n".join(in_readme(line) for line in result.stdout.splitlines())
    assert result.returncode == 0, f"mypy --strict on the README's snippets:\n{report}"
