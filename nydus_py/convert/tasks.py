"""Concurrent transfers that end together: one failure cancels the rest."""

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any


async def gather_or_cancel(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run `coros` as tasks; if one fails (or we are cancelled), cancel the others and wait for
    them to end before raising, so no upload or download outlives the call."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
