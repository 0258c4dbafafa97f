"""One llama.cpp server with SmolLM2-135M for the whole session, and the real openai client pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from moa_stream._cli._local import LocalServer

# The event log and the `wrapped` factory are the main suite's; `wrapped` wraps this suite's `upstream`.
from tests.conftest import EventLog, log, wrapped

__all__ = ["EventLog", "log", "wrapped"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The server process belongs to the event loop that started it, so every test shares that loop.
    session_loop = pytest.mark.asyncio(loop_scope="session")
    for item in items:
        if pytest_asyncio.is_async_test(item):
            item.add_marker(session_loop, append=False)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def llama() -> AsyncIterator[LocalServer]:
    async with LocalServer() as server:
        yield server


@pytest.fixture
def upstream(llama: LocalServer) -> openai.AsyncOpenAI:
    """The bare client: the real openai SDK over real HTTP to the local server."""
    return openai.AsyncOpenAI(base_url=llama.base_url, api_key="none", max_retries=0)
