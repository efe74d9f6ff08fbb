"""The typed errors of the backend. The service maps each class to one HTTP status."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class BackendError(Exception):
    """Base class; `param` names the request field at fault, when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def copy(self) -> BackendError:
        """The same error, fresh: a job keeps its error, and raising the kept one would keep the
        raiser's frames (and the request they hold) in its traceback for as long as the job."""
        clone = Exception.__new__(type(self), *self.args)
        clone.__dict__.update(self.__dict__)
        return clone


class InvalidRequest(BackendError):
    """A field has a value the service cannot honour (bad type, out of range, bad combination)."""


class NotPermitted(BackendError):
    """The request asks for what its API key may not have (a 'high' priority, say)."""


class PayloadTooLarge(BackendError):
    """An input is larger than the configured limit (bytes or pixels)."""


class InvalidImage(BackendError):
    """An input image that cannot be decoded (not an image, truncated, unsupported)."""


class UnknownModel(BackendError):
    """The requested model is not served; `available` lists what is."""

    def __init__(self, model: str, available: list[str]):
        super().__init__(
            f"model '{model}' is not available; available models: {', '.join(available) or 'none'}",
            param="model",
        )
        self.available = available


class OutOfMemory(BackendError):
    """The device ran out of memory and the request could not be completed."""


class Cancelled(BackendError):
    """The job was cancelled (by a client, or because its client went away)."""


class QueueFull(BackendError):
    """Too many jobs are waiting; `retry_after_s` says when to try again."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownJob(BackendError):
    """No job has this id."""


class JobExpired(BackendError):
    """The job finished long enough ago to be forgotten (SDXL_JOB_TTL_SECONDS and limits)."""


class TimedOut(BackendError):
    """The request's wait for its result ran past the configured timeout; the job was cancelled."""


class DeviceUnavailable(BackendError):
    """The device thread is gone: nothing can run until the service restarts."""


class StoreUnavailable(BackendError):
    """The shared store (Redis, SDXL_REDIS_URL) cannot be reached; the request can be retried."""


@contextmanager
def redis_failures_as_unavailable() -> Iterator[None]:
    """Redis out of reach (or too slow to answer) is `StoreUnavailable`, a 503 the client may retry."""
    import redis

    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(f"the shared store (Redis, SDXL_REDIS_URL) cannot be reached: {exc}") from None
