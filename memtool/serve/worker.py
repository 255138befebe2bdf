"""One thread that runs an engine's requests in turn, behind a bounded waiting line.

An engine serves one request at a time and its forward passes block, so they run on a dedicated
thread rather than on the server's event loop. Only that thread ever advances or closes an
engine's token stream, which makes stopping safe: a handler whose client went away just marks its
job cancelled, and the worker closes the stream between two tokens, which frees the engine.
(Closing a generator from another thread while it runs a forward pass would raise instead.)

Admission is counted in slots, one running request plus `max_queue` waiting: a request that finds
no slot is refused at once (the server answers 503) rather than waiting without bound.
"""

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from memtool.serve.engine import GenerationEngine, GenerationParams, TokenEvent

log = logging.getLogger(__name__)
_END = object()  # marks the end of a job's events


class QueueFullError(Exception):
    """Every slot is taken: the engine is busy and the waiting line is full."""


class Job:
    """One request on its way through the worker; its events arrive on the event loop."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        release: threading.Semaphore,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._slot = release
        self._state = "queued"  # -> "running" -> "done", or "queued" -> "done" when cancelled
        self._state_lock = threading.Lock()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the job: a waiting one gives up its slot now, a running one after the current
        token. Safe to call from any thread, any number of times."""
        self._cancelled.set()
        with self._state_lock:
            if self._state == "queued":
                self._state = "done"
                self._slot.release()

    async def events(self) -> AsyncIterator[TokenEvent]:
        """The job's token events, in order; an engine error is raised here."""
        while True:
            item = await self._events.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # The methods below run on the worker thread.

    def _start(self) -> bool:
        with self._state_lock:
            if self._state != "queued":
                return False  # cancelled while it waited
            self._state = "running"
            return True

    def _finish(self) -> None:
        with self._state_lock:
            if self._state == "running":
                self._state = "done"
                self._slot.release()
        self._put(_END)

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is left to read this job
            self._cancelled.set()


class GenerationWorker:
    """Runs jobs on one engine, one at a time, in arrival order.

    Args:
        engine: the engine to run.
        max_queue: how many requests may wait while one runs (0: none wait).
    """

    def __init__(self, engine: GenerationEngine, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, not {max_queue}")
        self.engine = engine
        self._slots = threading.Semaphore(max_queue + 1)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="memtool-generation")
            self._thread.daemon = True  # a forward pass in flight must not hold up interpreter exit
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel the running job and let the thread end (waiting jobs end with no events)."""
        if self._thread is None:
            return
        if self._current is not None:
            self._current.cancel()
        self._jobs.put(None)
        self._thread.join(timeout_s)
        self._thread = None

    def submit(self, prompt_ids: Sequence[int], params: GenerationParams) -> Job:
        """Queue a request; call it on the event loop that will read the job's events.

        Raises:
            QueueFullError: no slot is free.
            RuntimeError: the worker is not started.
        """
        if self._thread is None:
            raise RuntimeError("the generation worker is not running (is the app's lifespan on?)")
        if not self._slots.acquire(blocking=False):
            raise QueueFullError
        job = Job(prompt_ids, params, asyncio.get_running_loop(), self._slots)
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job._start():
                job._finish()
                continue
            self._current = job
            try:
                self._run_job(job)
            finally:
                self._current = None
                job._finish()
        # Jobs still waiting at shutdown end with no tokens; their handlers see an empty stream.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job._finish()

    def _run_job(self, job: Job) -> None:
        stream = None
        try:
            stream = self.engine.generate(job.prompt_ids, job.params)
            for event in stream:
                job._put(event)
                if job.cancelled:
                    break
        except Exception as exc:
            log.exception("generation failed")
            job._put(exc)
        finally:
            if stream is not None:
                stream.close()  # on this thread, between tokens: the engine is free again
