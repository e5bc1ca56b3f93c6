"""Shared pytest fixtures. Helpers meant for import live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator, so every test draws the same numbers on every run."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread for tests on tiny tensors: threading gains nothing there, and on a
    shared, loaded CPU the worker threads' spinning made such tests ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
