"""Domain errors of the serving layer, and the one place that maps every domain error to a status code."""

from __future__ import annotations

import grpc

from models.config import ConfigError
from samplers.errors import (
    BudgetExceeded,
    Cancelled,
    DeadlineExceeded,
    DiffservError,
    InvalidRequest,
    NonFiniteOutput,
    UnknownModel,
    quote,  # noqa: F401  (re-exported: server code quotes input through server.errors)
)


class NotReady(DiffservError):
    """The model is still loading or warming up, or the server is shutting down (-> UNAVAILABLE)."""


class QueueFull(DiffservError):
    """The model's admission queue is full (-> RESOURCE_EXHAUSTED)."""


class Unauthenticated(DiffservError):
    """Missing or wrong bearer token (-> UNAUTHENTICATED)."""


class NotImplementedYet(DiffservError):
    """A request block this server does not implement (-> UNIMPLEMENTED)."""


class QueueUnavailable(DiffservError):
    """The job queue's Redis cannot be reached, or the server runs without one (-> UNAVAILABLE)."""


class JobNotFound(DiffservError, LookupError):
    """No job has this id: never submitted, or removed with its results when its TTL ran out (-> NOT_FOUND)."""


class JobNotFinished(DiffservError):
    """The job has no results to read: it is still running, or it failed or was cancelled (-> FAILED_PRECONDITION)."""


class IdempotencyConflict(DiffservError):
    """An idempotency key was reused with a different request (-> ALREADY_EXISTS)."""


class CannotStart(DiffservError):
    """The server cannot start: its port is taken, or its local Redis data directory has another owner."""


STATUS = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModel, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (NotImplementedYet, grpc.StatusCode.UNIMPLEMENTED),
    (NonFiniteOutput, grpc.StatusCode.INTERNAL),
    (QueueUnavailable, grpc.StatusCode.UNAVAILABLE),
    (JobNotFound, grpc.StatusCode.NOT_FOUND),
    (JobNotFinished, grpc.StatusCode.FAILED_PRECONDITION),
    (IdempotencyConflict, grpc.StatusCode.ALREADY_EXISTS),
]


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-safe message: domain errors keep their message; anything else is INTERNAL
    with a generic message (no paths, no stack traces)."""
    for cls, code in STATUS:
        if isinstance(err, cls):
            return code, str(err) or cls.__doc__.splitlines()[0]
    return grpc.StatusCode.INTERNAL, "internal error while generating; the server log has the details"
