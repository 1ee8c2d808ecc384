"""What the package ships and says about itself: LICENSE, project URLs, the README as
the long description (absolute links), the pytest header naming the etcd binaries.

CI (.ci/run) also builds the wheel and sdist, runs `twine check` and checks that both
carry LICENSE; these tests keep the sources right without a build.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPOSITORY = "https://github.com/etcd-rendezvous/etcd-rendezvous"


def test_license_file_is_the_apache_2_text_the_metadata_names() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) > 150, "the full text, not a notice"


def test_project_urls_point_at_the_repository() -> None:
    urls = PYPROJECT["project"]["urls"]
    assert {"Homepage", "Repository", "Issues", "Changelog"} <= set(urls)
    for name, url in urls.items():
        assert url.startswith(REPOSITORY), (name, url)


def test_readme_links_are_absolute() -> None:
    """README.md is the long description on PyPI, where relative links break."""
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)", text)
    targets += re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", text)
    assert targets, "the README links to something"
    relative = [t for t in targets if not re.match(r"(https?://|mailto:|#)", t)]
    assert not relative, f"relative links in README.md: {relative}"
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text)
    raw = REPOSITORY.replace("https://github.com/", "https://raw.githubusercontent.com/")
    for image in images:
        assert image.startswith(raw + "/"), image
        # The file the link names exists in this checkout (path after the branch name).
        path = image[len(raw) + 1 :].split("/", 1)[1]
        assert (ROOT / path).is_file(), image


def test_pytest_header_names_the_etcd_binaries() -> None:
    from etcd_rendezvous.server import list_etcd_binaries

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--co", "-p", "no:cacheprovider", __file__],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    header = result.stdout.split("collected", 1)[0]
    assert "etcd binaries (each etcd-facing test runs once per binary):" in header, header
    for binary in list_etcd_binaries():
        assert f"etcd-{binary.version}: {binary.path} ({binary.source})" in header, header
