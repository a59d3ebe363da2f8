"""The bottom layer under the backends: their errors and the file utilities every layer above shares.

Layers (each imports only the ones before it): this module -> ONNX export (:mod:`models.export`) ->
TensorRT engines (:mod:`models.tensorrt_engine`) -> backend selection and the export command
(:mod:`models.backends`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from samplers.errors import DiffservError


class BackendUnavailable(DiffservError, RuntimeError):
    """The backend a model asks for is not installed or has no device; the message names what is missing."""


class ExportError(DiffservError, ValueError):
    """A model cannot be exported, or its export disagrees with the torch module."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the whole new one, never a torn write."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
