"""A redis-server child process on loopback: the local queue of `diffserve serve`, and the tests' Redis.

AOF persistence is on (appendfsync always by default: an accepted job survives a crash of Redis itself);
RDB snapshots are off.  The child gets SIGTERM if its parent dies, so a killed server leaves no Redis behind.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

HOW_TO_GET = ("the job queue needs Redis, and no redis-server program was found: install it (Debian/Ubuntu: "
              "apt-get install redis-server; macOS: brew install redis) and restart the server, or give the URL "
              "of a running Redis with --redis redis://HOST:6379")


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalRedis:
    def __init__(self, data_dir: str | Path, port: int | None = None, appendfsync: str = "always",
                 extra_args: tuple[str, ...] = (), binary: str | None = None, url: str | None = None):
        self.binary = binary or find_redis_server()
        if self.binary is None:
            raise FileNotFoundError(HOW_TO_GET)
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.appendfsync, self.extra_args = appendfsync, tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self._url = url  # how to reach it when extra_args change that (TLS only, say)

    @property
    def url(self) -> str:
        return self._url or f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> LocalRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no",
                "--logfile", "redis.log", *self.extra_args]
        # Dies with us.  setpriv sets the parent-death signal and execs redis-server in place, so no Python runs
        # between fork and exec: subprocess can vfork, and no fork handler (gRPC's, in a process serving already)
        # runs in the child; a preexec_fn there aborted the child under load.
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv is not None:
            self.process = subprocess.Popen([setpriv, "--pdeathsig", "TERM", *args], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        else:
            self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=1)
        while True:
            if self.process.poll() is not None:
                log = self.data_dir / "redis.log"
                tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
                raise RuntimeError(f"redis-server exited with status {self.process.returncode}: " + " | ".join(tail))
            try:
                if client.ping():
                    client.close()
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as err:
                if isinstance(err, redis.AuthenticationError):  # up, and wants a password
                    return
            if time.monotonic() > end:
                raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout:.0f} s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
