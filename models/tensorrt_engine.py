"""TensorRT engines built from a model's exported ONNX graph, cached on disk, run on torch CUDA buffers.

The build follows TensorRT's diffusion demo (``engine.py::Engine.build``; serving.md s.2.1): parse the ONNX
file, one optimisation profile per dynamic input covering batch 1..max_batch (and, for masked models,
length 1..max_length), FP16 when asked, strict FP32 otherwise (TF32 off, so fp32 parity holds). Engines
are not portable ("caches must be cleaned when the model, ORT version, TensorRT version or GPU
changes"), so the cache key is the ONNX file's hash + GPU model and compute capability + TensorRT, CUDA
and torch versions + precision + profile: an engine built elsewhere is never loaded, it is rebuilt, and
the stale file is removed. A plan that fails to deserialise is rebuilt too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import threading
from functools import cache
from pathlib import Path

import torch

from .artifacts import BackendUnavailable, ExportError, atomic_write, file_sha256
from .config import ModelEntry

log = logging.getLogger("diffserve.tensorrt")
OPT_BATCH = 16  # the profile's "opt" batch: what the batcher typically assembles under load


def require_tensorrt():
    """The tensorrt module, or BackendUnavailable naming what is missing (the package, or a CUDA device)."""

    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable("backend 'tensorrt': the tensorrt package is not installed; install the GPU "
                                 "extra: pip install 'diffserve[gpu]'") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"backend 'tensorrt': no CUDA device (torch {torch.__version__} reports "
                                 "torch.cuda.is_available() False); TensorRT engines run on NVIDIA GPUs only")
    return tensorrt


@cache
def gpu_model(index: int = 0) -> str:
    """'<name> sm<major><minor>' of the GPU, from torch or nvidia-smi; 'none' without one."""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(index)
        return f"{p.name} sm{p.major}{p.minor}"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", f"--id={index}", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().replace(", ", " sm").replace(".", "")
    return "none"


def library_versions() -> dict:
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("tensorrt", "onnxruntime"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def profile_shapes(manifest: dict, max_batch: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per input: batch 1..max_batch (opt OPT_BATCH), length 1..max_length."""
    length = manifest.get("max_length") or 1
    lows, opts, highs = {"batch": 1, "length": 1}, {"batch": min(OPT_BATCH, max_batch), "length": length}, \
        {"batch": max_batch, "length": length}
    return {spec["name"]: tuple(tuple(sizes[d] if isinstance(d, str) else d for d in spec["shape"])
                                for sizes in (lows, opts, highs)) for spec in manifest["inputs"]}


def engine_key(manifest: dict, fp16: bool, max_batch: int, index: int = 0) -> dict:
    """What an engine is only valid for; in JSON form, so it compares equal to the record written beside it."""
    key = {"onnx_sha256": manifest["onnx_sha256"], "gpu": gpu_model(index), **library_versions(), "fp16": fp16,
           "profile": profile_shapes(manifest, max_batch)}
    return json.loads(json.dumps(key, sort_keys=True))


def engine_key_digest(manifest: dict, fp16: bool, max_batch: int, index: int = 0) -> str:
    key = json.dumps(engine_key(manifest, fp16, max_batch, index), sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def build_engine(onnx_path: Path, manifest: dict, fp16: bool, max_batch: int) -> bytes:
    """Parse the ONNX file and build a serialized engine with one optimisation profile."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network has an explicit batch dimension
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"tensorrt cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(manifest, max_batch).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"tensorrt could not build an engine from {onnx_path.name} (see its log above)")
    return bytes(plan)


def engine_for(entry: ModelEntry, onnx_path: Path, manifest: dict, *, fp16: bool, max_batch: int,
               cache_dir: Path, index: int = 0, rebuild: bool = False) -> tuple[Path, bool]:
    """The cached engine for this ONNX file, GPU and library versions, building it when absent or stale."""
    require_tensorrt()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = engine_key(manifest, fp16, max_batch, index)
    stem = f"{entry.name}-{'fp16' if fp16 else 'fp32'}"
    path = cache_dir / f"{stem}-{engine_key_digest(manifest, fp16, max_batch, index)}.plan"
    sidecar = path.with_suffix(".json")
    if not rebuild and path.is_file() and sidecar.is_file():
        recorded = json.loads(sidecar.read_text())
        if recorded.get("key") == key and recorded.get("plan_sha256") == file_sha256(path):
            return path, False
        log.warning("model %s: cached engine %s does not match its record; rebuilding", entry.name, path.name)
    log.info("model %s: building a TensorRT engine (%s, batch 1..%d) on %s", entry.name,
             "fp16" if fp16 else "fp32", max_batch, key["gpu"])
    plan = build_engine(onnx_path, manifest, fp16, max_batch)
    atomic_write(path, plan)
    atomic_write(sidecar, (json.dumps({"key": key, "plan_sha256": file_sha256(path)}, indent=1) + "\n").encode())
    for stale in cache_dir.glob(f"{stem}-*.plan"):
        if stale != path:  # built for another GPU, library version, ONNX file or profile
            log.info("model %s: removing stale engine %s", entry.name, stale.name)
            stale.unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
    return path, True


class TensorRTRunner:
    """Runs a deserialised engine on torch CUDA tensors (TensorRT 10 tensor-address API), one call at a time."""

    def __init__(self, plan: bytes, manifest: dict, device: str):
        trt = require_tensorrt()
        self.device = torch.device(device if str(device).startswith("cuda") else "cuda")
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ExportError("the cached TensorRT engine does not deserialise")
        self.context = self.engine.create_execution_context()
        self.inputs, self.max_length = manifest["inputs"], manifest.get("max_length")
        self.output = manifest["output"]["name"]
        # the engine's own I/O types (a parser may have narrowed int64 ids to int32)
        types = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32}
        if hasattr(trt.DataType, "INT64"):
            types[trt.DataType.INT64] = torch.int64
        self.dtypes = {name: types[self.engine.get_tensor_dtype(name)]
                       for name in [s["name"] for s in self.inputs] + [self.output]}
        self.description = f"tensorrt {trt.__version__} ({gpu_model(self.device.index or 0)})"
        self._stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()

    @classmethod
    def from_cache(cls, entry: ModelEntry, onnx_path: Path, manifest: dict, *, fp16: bool, max_batch: int,
                   cache_dir: Path, device: str) -> TensorRTRunner:
        index = (torch.device(device).index or 0) if str(device).startswith("cuda") else 0
        path, built = engine_for(entry, onnx_path, manifest, fp16=fp16, max_batch=max_batch, cache_dir=cache_dir,
                                 index=index)
        try:
            runner = cls(path.read_bytes(), manifest, f"cuda:{index}")
        except ExportError:
            if built:
                raise
            log.warning("model %s: engine %s does not deserialise; rebuilding", entry.name, path.name)
            path, built = engine_for(entry, onnx_path, manifest, fp16=fp16, max_batch=max_batch,
                                     cache_dir=cache_dir, index=index, rebuild=True)
            runner = cls(path.read_bytes(), manifest, f"cuda:{index}")
        runner.engine_path, runner.built = path, built
        return runner

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        with self._lock, torch.cuda.stream(self._stream):
            buffers = [t.to(self.device, self.dtypes[s["name"]]).contiguous() for s, t in zip(self.inputs, tensors)]
            for spec, buf in zip(self.inputs, buffers):
                self.context.set_input_shape(spec["name"], tuple(buf.shape))
                self.context.set_tensor_address(spec["name"], buf.data_ptr())
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.dtypes[self.output],
                              device=self.device)
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError("tensorrt: executing the engine failed")
            self._stream.synchronize()
            return out.float().cpu()
