"""Fixtures of the end-to-end tests (the harness is in harness.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")

from e2e.harness import Torchrun, tagged_pids


@pytest.fixture
def torchrun(tmp_path: Path) -> Iterator[Torchrun]:
    runner = Torchrun(tmp_path)
    try:
        yield runner
    finally:
        runner.cleanup()
        for node in runner.nodes:
            assert not tagged_pids(node.tag), "a torchrun process outlived its test"


@pytest.fixture
def run_id() -> str:
    return f"e2e-{uuid.uuid4().hex[:10]}"
