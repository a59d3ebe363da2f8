"""Redis connections for the job queue: URLs with password / ACL user and TLS (rediss://), timeouts, backoff.

The server fails fast (a couple of quick retries, then UNAVAILABLE to the client); workers retry every
operation with capped exponential backoff until Redis answers again.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from models.config import ConfigError

from ..errors import QueueUnavailable

log = logging.getLogger("diffserve.queue")
# BusyLoadingError (Redis replaying its AOF after a restart) and AuthenticationError are ConnectionErrors.
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)
SCHEMES = ("redis", "rediss", "unix")
T = TypeVar("T")


def redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, *, fail_fast: bool, name: str = "diffserve") -> redis.Redis:
    """A client for `url` (redis://[user:password@]host:port/db, rediss:// for TLS, with ?ssl_ca_certs=... and
    the other redis-py URL options, or unix:///path). `fail_fast`: short timeouts, two quick retries."""
    if not isinstance(url, str) or urlsplit(url).scheme not in SCHEMES:
        raise ConfigError("redis_url: expected redis://, rediss:// or unix:// (e.g. redis://:password@host:6379/0)")
    if fail_fast:
        retry, connect_timeout, timeout = Retry(ExponentialBackoff(cap=0.4, base=0.05), 2), 1.0, 5.0
    else:  # blocking reads wait up to a second, so the socket timeout must be well above that
        retry, connect_timeout, timeout = Retry(ExponentialBackoff(cap=1.0, base=0.05), 1), 5.0, 15.0
    return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=timeout, retry=retry,
                                health_check_interval=15, client_name=name)


def unavailable(url: str, err: BaseException) -> QueueUnavailable:
    """The client-facing error for a Redis failure (never the password, never a stack trace)."""
    if isinstance(err, redis.AuthenticationError):
        return QueueUnavailable(f"the job queue's Redis at {redact(url)} refused the credentials in its URL")
    return QueueUnavailable(f"the job queue's Redis at {redact(url)} is unreachable; retry shortly")


class Backoff:
    """Capped exponential backoff with jitter: 0.1, 0.2, 0.4 ... up to `cap` seconds."""

    def __init__(self, base: float = 0.1, cap: float = 5.0):
        self.base, self.cap, self.failures = base, cap, 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2 ** self.failures)
        self.failures += 1
        return delay * (0.5 + random.random() / 2)


class Stopped(Exception):
    """The worker is stopping and Redis did not come back in time."""


def retry_forever(fn: Callable[[], T], stop: threading.Event, what: str, url: str) -> T:
    """Call `fn` until it succeeds; on a connection error wait (with backoff) and try again, unless stopping."""
    backoff = Backoff()
    while True:
        try:
            return fn()
        except CONNECTION_ERRORS as err:
            delay = backoff.next_delay()
            if backoff.failures in (1, 4) or backoff.failures % 20 == 0:
                log.warning("redis at %s unreachable during %s (%s); retrying in %.1f s", redact(url), what,
                            type(err).__name__, delay)
            if stop.wait(delay):
                raise Stopped(what) from err
        except redis.ResponseError as err:
            if "LOADING" not in str(err):
                raise
            if stop.wait(0.1):  # Redis is replaying its AOF after a restart
                raise Stopped(what) from err
