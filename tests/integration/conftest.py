"""Fixtures shared by the integration tests (on top of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.acceptance.harness import create_outbox_table, drop_outbox_table


@pytest.fixture
def outbox_table(postgres_url: str, unique_name: Callable[[str], str]) -> Iterator[str]:
    table = f"public.{unique_name('outbox')}"
    create_outbox_table(postgres_url, table)
    yield table
    drop_outbox_table(postgres_url, table)
