"""A one-shot wake-up for whoever waits at the moment it fires."""

from __future__ import annotations

import asyncio


class Signal:
    """Wakes whoever waits at the time it fires (an Event made on demand, dropped when set):
    a waiter that comes after a fire waits for the next one."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    def fire(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()
