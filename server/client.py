"""A small client for a running diffserve server (used by `diffserve generate --server`, `models`, `samplers`)."""

from __future__ import annotations

import grpc
import numpy as np

from . import protogen


def connect(address: str, token: str | None = None, ca: str | None = None):
    """(pb module, stub, call metadata) for a server at HOST:PORT."""
    pb, pb_grpc = protogen.load()
    if ca:
        with open(ca, "rb") as f:
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(address)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return pb, pb_grpc.DiffserveStub(channel), metadata


def tensor_to_array(t) -> np.ndarray:
    return np.frombuffer(t.data, dtype=np.dtype(t.dtype).newbyteorder("<")).reshape(tuple(t.shape))
