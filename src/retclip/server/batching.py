"""The bounded job queue: micro-batches of waiting jobs run by at most ``max_concurrency``
worker threads; a full queue answers 503 and a job past its time 504."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from retclip.server.config import ServerConfig, ServerError


@dataclasses.dataclass(eq=False)
class _Job:
    key: tuple[Any, ...]
    run: Callable[[list[Any]], list[Any]]
    payload: Any
    future: asyncio.Future[Any]


class Dispatcher:
    """A bounded queue of model jobs, run in micro-batches by at most ``max_concurrency`` threads.

    Jobs with the same ``key`` taken together run as one call ``run(payloads)``, which returns one
    result (or a :class:`RetclipError`) per payload.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=config.max_queue)
        self.slots = asyncio.Semaphore(config.max_concurrency)
        self.running = 0
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._batches) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def submit(
        self,
        key: tuple[Any, ...],
        run: Callable[[list[Any]], list[Any]],
        payload: Any,
        *,
        on_timeout: Callable[[], None] | None = None,
    ) -> Any:
        """Queue one job and wait for its result (503 when the queue is full, 504 on timeout).

        ``on_timeout`` is called when the wait times out, so work already running can stop
        (a job still queued is skipped anyway)."""
        job = _Job(key, run, payload, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ServerError(
                503,
                f"server busy: {self.config.max_queue} requests are already queued; retry later",
                {"Retry-After": "1"},
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.config.timeout_s)
        except TimeoutError:
            job.future.cancel()
            if on_timeout is not None:
                on_timeout()
            raise ServerError(
                504, f"the request did not finish within {self.config.timeout_s:g} s"
            ) from None

    async def _loop(self) -> None:
        wait = self.config.batch_wait_ms / 1000.0
        loop = asyncio.get_running_loop()
        while True:
            await self.slots.acquire()
            batch = [await self.queue.get()]
            deadline = loop.time() + wait
            while len(batch) < self.config.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            task = loop.create_task(self._run(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[_Job]) -> None:
        self.running += 1
        try:
            groups: dict[tuple[Any, ...], list[_Job]] = {}
            for job in batch:
                if not job.future.done():  # timed out or cancelled while queued
                    groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                try:
                    outcomes = await asyncio.to_thread(jobs[0].run, [j.payload for j in jobs])
                except Exception as error:  # handed to the waiting requests
                    outcomes = [error] * len(jobs)
                for job, outcome in zip(jobs, outcomes, strict=True):
                    if job.future.done():
                        continue
                    if isinstance(outcome, BaseException):
                        job.future.set_exception(outcome)
                    else:
                        job.future.set_result(outcome)
        finally:
            self.running -= 1
            self.slots.release()
