"""The device thread: the one thread that does a device's torch work.

Model loads, the warm-up, generations, previews, LoRA and ControlNet loads and unloads all
run here; the event loop and the request threads run no torch op (they decode and check input
images with PIL). Why one thread: on the CPU, torch's OpenMP thread pool belongs to the
thread that runs an op. A second thread that ever ran a parallel op keeps a second pool in
the process, and with more OpenMP threads than cores libgomp stops letting its workers spin
between parallel regions: every region of the busy pool then pays a sleep and a wake-up. A
generation on a second thread after one on the main thread was measured 3-4x slower on 2 cores
than the same generation with one pool. On CUDA one thread also keeps the device's work in one
ordered stream.

The job queue's loop runs on this thread (`start`); other threads hand it work with `call`
(an unload, the warm-up), which it runs before it takes the next job. `TORCH_WORK` records
which threads did each kind of torch work, so that the service can show (and a test check)
that it was this one alone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from backends.sdxl_backend.errors import DeviceUnavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container's cpuset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class TorchWork:
    """Which threads did each kind of torch work in this process (load, warm-up, generate,
    preview, unload): the device thread alone, when all is well."""

    def __init__(self) -> None:
        self._threads: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def note(self, kind: str) -> None:
        name = threading.current_thread().name
        if name not in self._threads.get(kind, ()):  # (read without the lock: it only ever grows)
            with self._lock:
                self._threads.setdefault(kind, set()).add(name)

    def threads(self) -> dict[str, list[str]]:
        with self._lock:
            return {kind: sorted(names) for kind, names in sorted(self._threads.items())}


TORCH_WORK = TorchWork()


class DeviceThread:
    """The thread that owns a device: it sets torch's thread count for itself, runs the work
    other threads hand it, and runs the job queue's loop in between."""

    def __init__(self, torch_threads: int | None = None, name: str = "sdxl-device"):
        self.torch_threads_wanted = torch_threads or usable_cores()
        self.torch_threads: int | None = None  # as torch reports it on the thread, once started
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._loop: Callable[[], None] = lambda: None
        self._wake: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._stopped = False  # no more calls are run: they fail at once
        self._at_exit: list[Callable[[], object]] = []

    def start(self, loop: Callable[[], None], wake: Callable[[], None]) -> None:
        """Run `loop` (the queue's: take jobs, run them, and `run_calls` between them) on the
        thread; `wake` makes that loop look at its calls when it waits for jobs."""
        self._loop, self._wake = loop, wake
        self._thread.start()

    def call(self, action: Callable[[], T]) -> Future[T]:
        """`action` to run on the device thread before it takes its next job; its future holds
        what it returns or raises. On the device thread itself it runs at once."""
        future: Future[T] = Future()
        if threading.current_thread() is self._thread:
            self._settle(action, future)
            return future
        with self._lock:
            if self._stopped:
                future.set_exception(DeviceUnavailable("the device thread has stopped; the service must be restarted"))
                return future
            self._calls.append((action, future))
        self._wake()
        return future

    def run_at_exit(self, action: Callable[[], object]) -> None:
        """`action` to run on the thread when its loop has ended (freeing the models)."""
        self._at_exit.append(action)

    def run(self, action: Callable[[], T]) -> T:
        """`action` run on the device thread, waited for."""
        return self.call(action).result()

    @property
    def pending(self) -> bool:
        return bool(self._calls)

    def run_calls(self) -> None:
        """The loop's part: run the work handed over since it last looked."""
        while self._calls:
            with self._lock:
                action, future = self._calls.popleft()
            self._settle(action, future)

    @staticmethod
    def _settle(action: Callable[[], T], future: Future[T]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(action())
        except BaseException as exc:  # the caller's to see; the thread goes on
            future.set_exception(exc)

    def _main(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads_wanted)  # this thread's pool: set here, where it runs
        self.torch_threads = torch.get_num_threads()
        logger.info(
            "device thread: torch uses %d CPU thread(s) (SDXL_TORCH_THREADS), OpenMP wait policy %s",
            self.torch_threads,
            os.environ.get("OMP_WAIT_POLICY", "libgomp's default"),
        )
        try:
            self.run_calls()  # (the warm-up, handed over before the start: before any job)
            self._loop()
        finally:
            self.run_calls()
            for action in self._at_exit:
                try:
                    action()
                except Exception:
                    logger.exception("the device thread failed at its exit")
            with self._lock:
                self._stopped = True
                left, self._calls = list(self._calls), deque()
            for _, future in left:
                future.set_exception(DeviceUnavailable("the device thread has stopped"))

    @property
    def name(self) -> str:
        return self._thread.name

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
