"""Fixtures of the multi-host test bed (``netlab.py``): skipped, with the reason, where
network namespaces cannot be created (not root, no iproute2, a sandbox without them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from multihost.netlab import Lab, unavailable


@pytest.fixture(scope="session")
def netns_available() -> None:
    reason = unavailable()
    if reason:
        pytest.skip(f"multi-host test bed unavailable: {reason}")


@pytest.fixture
def make_lab(netns_available: None) -> Iterator[Callable[[list[str]], Lab]]:
    """``make_lab(names)``: an open :class:`Lab`; closed after the test, and checked to
    have left nothing (namespace, link, hosts file, data, process)."""
    labs: list[Lab] = []

    def make(names: list[str]) -> Lab:
        lab = Lab(names)
        labs.append(lab)
        lab.open()
        return lab

    yield make
    for lab in labs:
        lab.close()
    left = [x for lab in labs for x in lab.leftovers()]
    assert not left, f"the lab left these behind: {left}"
