"""Checkpoint safety: safetensors only; pickled weights are refused with a conversion hint."""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

CONVERT_HINT = (
    "convert it once, on a machine you trust, with: python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('model.bin', weights_only=True), 'model.safetensors')\" "
    "(or save_pretrained(..., safe_serialization=True))")


class UnsafeCheckpoint(ValueError):
    """A checkpoint directory holds only pickled weights, which can execute code when loaded."""


def require_safetensors(directory: Path, what: str) -> None:
    """Raise unless `directory` holds safetensors weights (pickled files alone are refused)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what}: no such directory {directory.name!r}")
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UnsafeCheckpoint(f"{what}: only pickled weights ({', '.join(pickled)}) found; diffserve loads "
                               f"safetensors only, because unpickling can execute code; {CONVERT_HINT}")
    raise UnsafeCheckpoint(f"{what}: no .safetensors weights found")
