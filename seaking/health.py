"""Health checks: targets whose breaker is open (or that were never used) are probed in the background, so that they
come back without live traffic having to risk a request on them."""

from __future__ import annotations

import asyncio


class HealthChecks:
    """mitmproxy addon: one background task, from running to done."""

    name = "seaking.health"

    def __init__(self, shared) -> None:
        self.shared = shared
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._check_forever())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _check_forever(self) -> None:
        while True:
            config = self.shared.config
            interval = config.health_check.interval if config else 0
            if interval <= 0:
                await asyncio.sleep(1)
                continue
            doubtful = [t for t in self.shared.failover.pool.targets if t.state != "closed"]
            await asyncio.gather(*(self.shared.upstream.probe(t, config.retry) for t in doubtful))
            await asyncio.sleep(interval)
