"""Export the network behind a served model to ONNX with a dynamic batch axis, checked, with a manifest.

The recipe of TensorRT's diffusion demo (``model/base_model.py::export_onnx``; serving.md s.2.1):
``torch.onnx.export`` with named inputs, dynamic axes and constant folding, then ``onnx.checker``. Each
model kind exposes its network as a tensor-only module (a :class:`Graph`):

* diffusion / flow (diffusers UNet2DModel): ``sample (B,C,H,W) f32, timestep (B,) f32[, class_labels (B,) i64]``
  -> ``out (B,C,H,W)``; the timestep is already in the UNet's own units, labels already mapped to the null class.
* meanflow (MeanFlowNet): ``z (B,C,H,W), t (B,), h (B,) f32, class_labels (B,) i64`` -> ``u`` (h = t - r).
* masked (transformers masked LM): ``input_ids (B,L) i64`` -> ``logits (B,L,V) f32``.

The file and a manifest (inputs, output, dtypes, opset, the sha256 of the ONNX file and of the source
checkpoint) live beside the model (``<model>/onnx/``) or in the entry's ``export_dir``. A cached export
is reused only while the manifest matches both files, so a corrupt file or a retrained checkpoint is
exported again. ``fp16`` exports half-precision weights behind float32 inputs and outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .artifacts import ExportError, atomic_write, file_sha256
from .config import ModelEntry
from .safety import require_safetensors

log = logging.getLogger("diffserve.export")

FORMAT = "diffserve-onnx/1"
DEFAULT_OPSET = 17
DEFAULT_MAX_BATCH = 64
EXPORT_DIRNAME = "onnx"
VERIFY_ATOL = {"fp32": 1e-3, "fp16": 5e-2}  # export-time sanity check; the parity tests are far tighter


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, shape (ints, or axis names "batch" / "length"), numpy dtype."""

    name: str
    shape: tuple
    dtype: str
    low: float = 0.0  # example values: uniform [low, high) for times and ids, standard normal when high is None
    high: float | None = None

    def concrete(self, batch: int, length: int | None = None) -> tuple[int, ...]:
        sizes = {"batch": batch, "length": length}
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def as_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Graph:
    """A served model's network as a module with tensor inputs in a fixed order."""

    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    output: TensorSpec
    max_length: int | None = None  # masked models: the longest sequence

    def example(self, batch: int, length: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        length = length or self.max_length
        out = {}
        for spec in self.inputs:
            shape = spec.concrete(batch, length)
            if spec.dtype == "int64":
                out[spec.name] = torch.randint(int(spec.low), int(spec.high), shape, generator=g)
            elif spec.high is None:
                out[spec.name] = torch.randn(shape, generator=g)
            else:
                out[spec.name] = spec.low + (spec.high - spec.low) * torch.rand(shape, generator=g)
        return out


class UNetGraph(nn.Module):
    """UNet2DModel(sample, timestep, class_labels).sample, the learned-variance half dropped."""

    def __init__(self, unet, half: bool = False):
        super().__init__()
        self.unet = unet.half() if half else unet
        self.dtype = torch.float16 if half else torch.float32
        self.channels = unet.config.in_channels
        self.learned_variance = unet.config.out_channels == 2 * unet.config.in_channels

    def forward(self, sample, timestep, class_labels=None):
        out = self.unet(sample.to(self.dtype), timestep, class_labels=class_labels).sample
        return (out[:, : self.channels] if self.learned_variance else out).float()


class MeanFlowGraph(nn.Module):
    """MeanFlowNet.forward(z, t, h, class_labels): the average velocity over [t - h, t]."""

    def __init__(self, net, half: bool = False):
        super().__init__()
        self.net = net.half() if half else net
        self.dtype = torch.float16 if half else torch.float32

    def forward(self, z, t, h, class_labels):
        return self.net(z.to(self.dtype), t.to(self.dtype), h.to(self.dtype), class_labels).float()


class MaskedLMGraph(nn.Module):
    """A transformers masked LM: input ids -> logits, attending to every position (as HFMaskedLM.logits)."""

    def __init__(self, model, half: bool = False):
        super().__init__()
        self.model = model.half() if half else model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.float()


def _unet_graph(directory: Path, half: bool) -> Graph:
    from diffusers import UNet2DModel

    require_safetensors(directory / "unet", "unet")
    unet = UNet2DModel.from_pretrained(directory / "unet", use_safetensors=True, local_files_only=True)
    c, s = unet.config.in_channels, unet.config.sample_size
    inputs = [TensorSpec("sample", ("batch", c, s, s), "float32"),
              TensorSpec("timestep", ("batch",), "float32", 0.0, 1000.0)]
    if unet.config.num_class_embeds is not None:
        inputs.append(TensorSpec("class_labels", ("batch",), "int64", 0, unet.config.num_class_embeds))
    return Graph(UNetGraph(unet, half), tuple(inputs), TensorSpec("out", ("batch", c, s, s), "float32"))


def _meanflow_graph(directory: Path, half: bool) -> Graph:
    from .meanflow_net import load_meanflow_net

    require_safetensors(directory, "meanflow")
    net = load_meanflow_net(directory)
    c, s = net.unet.config.in_channels, net.unet.config.sample_size
    inputs = (TensorSpec("z", ("batch", c, s, s), "float32"), TensorSpec("t", ("batch",), "float32", 0.0, 1.0),
              TensorSpec("h", ("batch",), "float32", 0.0, 1.0),
              TensorSpec("class_labels", ("batch",), "int64", 0, net.num_class_embeds))
    return Graph(MeanFlowGraph(net, half), inputs, TensorSpec("u", ("batch", c, s, s), "float32"))


def _masked_graph(directory: Path, half: bool) -> Graph:
    from .masked_lm import load_masked_lm

    lm = load_masked_lm(directory)
    inputs = (TensorSpec("input_ids", ("batch", "length"), "int64", 0, lm.vocab_size),)
    output = TensorSpec("logits", ("batch", "length", lm.vocab_size), "float32")
    return Graph(MaskedLMGraph(lm.model, half), inputs, output, max_length=lm.length)


GRAPHS = {"diffusion": _unet_graph, "flow": _unet_graph, "meanflow": _meanflow_graph, "masked": _masked_graph}


def network_graph(entry: ModelEntry, half: bool = False) -> Graph:
    """The entry's network as a read-only, eval-mode Graph on the CPU."""
    graph = GRAPHS[entry.kind](Path(entry.directory), half)
    graph.module.eval().requires_grad_(False)
    return graph


def source_sha256(directory: Path) -> str:
    """One hash over the checkpoint: every *.safetensors and config.json under the model directory."""
    directory = Path(directory)
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json") and EXPORT_DIRNAME not in rel.parts:
            h.update(str(rel).encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def export_dir(entry: ModelEntry) -> Path:
    """Where the entry's exports live: `export_dir` from its config (relative to the model), else <model>/onnx."""
    configured = entry.extra.get("export_dir")
    return (Path(entry.directory) / configured).resolve() if configured else Path(entry.directory) / EXPORT_DIRNAME


def export_paths(out_dir: Path, fp16: bool) -> tuple[Path, Path]:
    stem = "network-fp16" if fp16 else "network"
    return out_dir / f"{stem}.onnx", out_dir / f"{stem}.json"


def _prepare_dir(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    ignore = out_dir / ".gitignore"
    if not ignore.exists():  # a cache, never data to commit (as .pytest_cache does)
        ignore.write_text("# diffserve export cache\n*\n")


def verify_export(graph: Graph, path: Path, precision: str) -> float:
    """Run the exported file on ONNX Runtime's CPU provider against torch at two batch sizes; max abs diff."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in (1, 3):
        example = graph.example(batch, seed=batch)
        with torch.no_grad():
            want = graph.module(*example.values()).numpy()
        got = session.run([graph.output.name], {k: v.numpy() for k, v in example.items()})[0]
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= VERIFY_ATOL[precision] * max(1.0, float(np.abs(want).max())):
        raise ExportError(f"the exported graph disagrees with torch (max abs difference {worst:.3g})")
    return worst


def export_onnx(entry: ModelEntry, *, out_dir: Path | None = None, opset: int = DEFAULT_OPSET, fp16: bool = False,
                max_batch: int = DEFAULT_MAX_BATCH) -> tuple[Path, dict]:
    """Export the entry's network to ONNX (dynamic batch), check it, verify it, and write its manifest."""
    if not 7 <= opset <= 21:
        raise ExportError(f"opset: {opset} is outside [7, 21]")
    if max_batch < 1:
        raise ExportError(f"max_batch: {max_batch} must be at least 1")
    import onnx

    out_dir = Path(out_dir) if out_dir is not None else export_dir(entry)
    _prepare_dir(out_dir)
    path, manifest_path = export_paths(out_dir, fp16)
    graph = network_graph(entry, half=fp16)
    example = graph.example(2)  # batch 2: a batch of 1 invites the tracer to fold the batch size in
    names = [s.name for s in graph.inputs]
    dynamic = {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
               for s in (*graph.inputs, graph.output)}
    tmp = out_dir / f".{path.stem}.{os.getpid()}.tmp.onnx"
    start = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(graph.module, tuple(example.values()), str(tmp), dynamo=False, opset_version=opset,
                              do_constant_folding=True, input_names=names, output_names=[graph.output.name],
                              dynamic_axes=dynamic)
        onnx.checker.check_model(str(tmp), full_check=True)
        precision = "fp16" if fp16 else "fp32"
        worst = verify_export(graph, tmp, precision)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = {
        "format": FORMAT, "model": entry.name, "kind": entry.kind, "file": path.name,
        "onnx_sha256": file_sha256(path), "source_sha256": source_sha256(entry.directory),
        "opset": opset, "precision": precision, "max_batch": max_batch, "max_length": graph.max_length,
        "inputs": [s.as_json() for s in graph.inputs], "output": graph.output.as_json(),
        "checked": "onnx.checker (full_check)", "verify_max_abs_diff": worst,
        "export_seconds": round(time.perf_counter() - start, 2),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    atomic_write(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    log.info("model %s: exported %s (opset %d, %s) in %.1f s", entry.name, path, opset, precision,
             manifest["export_seconds"])
    return path, manifest


def cache_problem(path: Path, manifest_path: Path, source: str, opset: int) -> str | None:
    """Why a cached export cannot be used (None when it can)."""
    if not path.is_file():
        return "no exported file"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return "its manifest is missing or unreadable"
    if manifest.get("format") != FORMAT:
        return f"its manifest format is {manifest.get('format')!r}, not {FORMAT!r}"
    if manifest.get("onnx_sha256") != file_sha256(path):
        return f"{path.name} is corrupt (its sha256 does not match the manifest)"
    if manifest.get("source_sha256") != source:
        return "the checkpoint changed since the export"
    if manifest.get("opset") != opset:
        return f"it was exported with opset {manifest.get('opset')}, not {opset}"
    return None


def ensure_onnx(entry: ModelEntry, *, out_dir: Path | None = None, opset: int = DEFAULT_OPSET, fp16: bool = False,
                max_batch: int = DEFAULT_MAX_BATCH) -> tuple[Path, dict]:
    """The cached export when it is intact and current, else a fresh export (a corrupt file is rebuilt)."""
    out_dir = Path(out_dir) if out_dir is not None else export_dir(entry)
    path, manifest_path = export_paths(out_dir, fp16)
    problem = cache_problem(path, manifest_path, source_sha256(entry.directory), opset)
    if problem is None:
        return path, json.loads(manifest_path.read_text())
    if path.exists():
        log.warning("model %s: cached export %s is unusable: %s; exporting again", entry.name, path, problem)
    return export_onnx(entry, out_dir=out_dir, opset=opset, fp16=fp16, max_batch=max_batch)
