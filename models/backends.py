"""Backends: run a served model's network as torch, torch.compile, ONNX Runtime or a TensorRT engine.

A model's config entry picks one; everything else (samplers, searches, the batching engine) is unchanged,
because only the network inside the served contract is swapped (Denoiser.net, AverageVelocity.u, the masked
model's logits), with the same time scaling and null-label mapping the torch loaders apply::

    [[models]]
    name = "digits-ddpm"
    backend = "onnxruntime"            # torch (default) | torch-compile | onnxruntime | tensorrt
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # default: TensorRT EP, CUDA EP, CPU EP,
                                       # whichever the installed onnxruntime offers
    engine_cache = "/var/cache/diffserve"   # TensorRT engines (tensorrt backend, ORT TensorRT EP)
    fp16 = false
    max_batch = 64                     # TensorRT optimisation profile: batch 1..max_batch
    fallback = ["onnxruntime", "torch"]  # tried in order when the backend is not installed / has no device

A backend that is missing is an error naming what is missing (BackendUnavailable), never a silent
switch: only the entry's own `fallback` list allows one. Sessions and engines are built (and run once)
here, at load time, so the server's health turns SERVING only after they exist.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from samplers.denoiser import NULL_LABEL

from .artifacts import BackendUnavailable, ExportError
from .config import ConfigError, ModelEntry
from .export import DEFAULT_MAX_BATCH, DEFAULT_OPSET, ensure_onnx, export_dir, export_onnx, network_graph

log = logging.getLogger("diffserve.backends")

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_HINT = "the GPU providers come with onnxruntime-gpu: pip install 'diffserve[gpu]'"


@dataclass(frozen=True)
class BackendOptions:
    backend: str = "torch"
    providers: tuple[str, ...] | None = None
    engine_cache: Path | None = None
    fp16: bool = False
    fallback: tuple[str, ...] = ()
    max_batch: int = DEFAULT_MAX_BATCH
    opset: int = DEFAULT_OPSET
    threads: int = 0  # ONNX Runtime intra-op threads; 0 = its default (one per physical core)


def _names(entry: ModelEntry, key: str, value) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"model {entry.name!r}: {key}: expected a list of names, got {value!r}")
    return tuple(value)


def backend_options(entry: ModelEntry) -> BackendOptions:
    """The backend settings of a config entry (they arrive in entry.extra); bad values name the field."""
    extra, where = entry.extra, f"model {entry.name!r}"
    backend = extra.get("backend", "torch")
    fallback = _names(entry, "fallback", extra.get("fallback", []))
    for key, name in [("backend", backend), *(("fallback", f) for f in fallback)]:
        if name not in BACKENDS:
            raise ConfigError(f"{where}: {key}: {name!r} is not one of {list(BACKENDS)}")
    providers = extra.get("providers")
    providers = None if providers is None else _names(entry, "providers", providers)
    ints = {}
    for key, default, low in (("max_batch", DEFAULT_MAX_BATCH, 1), ("opset", DEFAULT_OPSET, 7), ("threads", 0, 0)):
        value = extra.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{where}: {key}: expected an integer >= {low}, got {value!r}")
        ints[key] = value
    fp16 = extra.get("fp16", False)
    if not isinstance(fp16, bool):
        raise ConfigError(f"{where}: fp16: expected true or false, got {fp16!r}")
    if fp16 and backend == "torch":
        raise ConfigError(f"{where}: fp16: applies to the torch-compile, onnxruntime and tensorrt backends")
    cache = extra.get("engine_cache")
    if cache is not None and not isinstance(cache, str):
        raise ConfigError(f"{where}: engine_cache: expected a directory path, got {cache!r}")
    engine_cache = (Path(entry.directory) / cache).resolve() if cache else export_dir(entry) / "engines"
    return BackendOptions(backend, providers, engine_cache, fp16, fallback, **ints)


# Runners: the exported network's inputs in manifest order -> a float32 CPU tensor.

# Every runner has `inputs` (the manifest's input specs, in order), `max_length` (masked models) and a
# `description` for GetModel.

class OrtRunner:
    """An ONNX Runtime session over the exported graph (numpy in, numpy out)."""

    def __init__(self, session, manifest: dict):
        self.session, self.inputs, self.max_length = session, manifest["inputs"], manifest.get("max_length")
        self.output = manifest["output"]["name"]
        self.description = f"onnxruntime ({', '.join(session.get_providers())})"

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        feeds = {spec["name"]: np.ascontiguousarray(t.numpy()) for spec, t in zip(self.inputs, tensors)}
        return torch.from_numpy(self.session.run([self.output], feeds)[0])


class TorchRunner:
    """A (compiled) torch module over the same tensor inputs as the exported graph."""

    def __init__(self, module, graph, device: str, description: str):
        self.module, self.device, self.description = module, torch.device(device), description
        self.inputs, self.max_length = [s.as_json() for s in graph.inputs], graph.max_length
        self._lock = threading.Lock()  # a compiled module is not safe to (re)compile from two threads

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        with self._lock, torch.inference_mode():
            return self.module(*(t.to(self.device) for t in tensors)).float().cpu()


class Chunked:
    """Splits a batch larger than an engine's optimisation profile into profile-sized pieces."""

    def __init__(self, runner, max_batch: int):
        self.runner, self.max_batch = runner, max_batch
        self.inputs, self.max_length, self.description = runner.inputs, runner.max_length, runner.description

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        n, m = tensors[0].shape[0], self.max_batch
        if n <= m:
            return self.runner(*tensors)
        return torch.cat([self.runner(*(t[i: i + m] for t in tensors)) for i in range(0, n, m)])


def warm_up(runner) -> None:
    """One forward at batch 1 and 2 (zeros are valid ids and labels), so the first request builds nothing."""
    for batch in (1, 2):
        sizes = {"batch": batch, "length": runner.max_length}
        shapes = [tuple(sizes[d] if isinstance(d, str) else d for d in s["shape"]) for s in runner.inputs]
        runner(*(torch.zeros(shape, dtype=getattr(torch, s["dtype"])) for shape, s in zip(shapes, runner.inputs)))


# Builders: entry + options -> runner, or BackendUnavailable naming what is missing.

def choose_providers(available: list[str], requested: tuple[str, ...] | None, version: str) -> list[str]:
    """Requested providers must all be installed; the default list takes whichever are."""
    if requested is None:
        return [p for p in DEFAULT_PROVIDERS if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        raise BackendUnavailable(f"backend 'onnxruntime': provider {', '.join(missing)} is not available in the "
                                 f"installed onnxruntime {version} (it offers {', '.join(available)}); {GPU_HINT}")
    return list(requested)


def _provider_options(provider: str, manifest: dict, opts: BackendOptions, device: str) -> dict:
    index = torch.device(device).index or 0
    if provider == "CUDAExecutionProvider":
        return {"device_id": index, "use_tf32": int(opts.fp16)}  # fp32 means fp32: TF32 would cost ~1e-3
    if provider != "TensorrtExecutionProvider":
        return {}
    from .tensorrt_engine import engine_key_digest, profile_shapes

    # ORT's engine cache is not keyed by GPU or library version: give each combination its own directory.
    cache = opts.engine_cache / f"ort-trt-{engine_key_digest(manifest, opts.fp16, opts.max_batch)}"
    cache.mkdir(parents=True, exist_ok=True)
    shapes = profile_shapes(manifest, opts.max_batch)

    def spec(k):
        return ",".join(f"{name}:{'x'.join(map(str, s[k]))}" for name, s in shapes.items())
    return {"device_id": index, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache), "trt_fp16_enable": opts.fp16,
            "trt_profile_min_shapes": spec(0), "trt_profile_opt_shapes": spec(1), "trt_profile_max_shapes": spec(2)}


def _onnxruntime(entry: ModelEntry, opts: BackendOptions, device: str):
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("backend 'onnxruntime': the onnxruntime package is not installed "
                                 "(pip install onnxruntime; GPU: pip install 'diffserve[gpu]')") from None
    providers = choose_providers(ort.get_available_providers(), opts.providers, ort.__version__)
    path, manifest = ensure_onnx(entry, out_dir=export_dir(entry), opset=opts.opset, fp16=opts.fp16,
                                 max_batch=opts.max_batch)
    chosen = [(p, _provider_options(p, manifest, opts, device)) for p in providers]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = opts.threads
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf

    try:
        session = ort.InferenceSession(str(path), so, providers=chosen)
    except (InvalidProtobuf, InvalidGraph) as err:  # hashes right yet will not parse: export once more
        log.warning("model %s: onnxruntime cannot load %s (%s); exporting again", entry.name, path.name, err)
        path, manifest = export_onnx(entry, out_dir=export_dir(entry), opset=opts.opset, fp16=opts.fp16,
                                     max_batch=opts.max_batch)
        session = ort.InferenceSession(str(path), so, providers=chosen)
    used = session.get_providers()
    dropped = [p for p in providers if p not in used]
    if dropped and opts.providers is not None:  # ORT silently drops a provider that fails to start
        raise BackendUnavailable(f"backend 'onnxruntime': provider {', '.join(dropped)} is installed but could "
                                 "not start (no GPU device, or its CUDA / TensorRT libraries are missing)")
    if dropped:
        log.info("model %s: onnxruntime providers %s could not start; using %s", entry.name, dropped, used)
    return OrtRunner(session, manifest)


def _tensorrt(entry: ModelEntry, opts: BackendOptions, device: str):
    from .tensorrt_engine import TensorRTRunner, require_tensorrt

    require_tensorrt()
    path, manifest = ensure_onnx(entry, out_dir=export_dir(entry), opset=opts.opset, max_batch=opts.max_batch)
    runner = TensorRTRunner.from_cache(entry, path, manifest, fp16=opts.fp16, max_batch=opts.max_batch,
                                       cache_dir=opts.engine_cache, device=device)
    return Chunked(runner, opts.max_batch)


def _torch_compile(entry: ModelEntry, opts: BackendOptions, device: str):
    graph = network_graph(entry, half=opts.fp16)
    module = torch.compile(graph.module.to(device), dynamic=True)
    runner = TorchRunner(module, graph, device,
                         f"torch-compile (inductor, dynamic batch{', fp16' if opts.fp16 else ''})")
    try:
        warm_up(runner)  # compiles now (batch 1 is specialised apart from the rest), not in the first request
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendUnavailable(f"backend 'torch-compile': compiling the network failed ({first}); "
                                 "inductor needs a working C++ compiler on CPU, Triton on GPU") from err
    return runner


BUILDERS = {"torch-compile": _torch_compile, "onnxruntime": _onnxruntime, "tensorrt": _tensorrt}


# Adapters: the served contract of each kind over a runner (same conventions as the torch loaders).

def _map_labels(labels, n: int, null_class: int | None) -> torch.Tensor:
    labels = torch.full((n,), NULL_LABEL) if labels is None else torch.as_tensor(labels)
    return torch.where(labels < 0, torch.full_like(labels, null_class or 0), labels).long()


def _unet_adapter(loaded, runner):
    from .diffusers_loader import load_scheduler_config, map_scheduler_config

    time_scale = map_scheduler_config(load_scheduler_config(loaded.entry.directory)).time_scale
    null_class = loaded.entry.null_class
    conditional = any(spec["name"] == "class_labels" for spec in runner.inputs)

    def net(x_t, t, labels=None):
        n = x_t.shape[0]
        timesteps = (torch.as_tensor(t, dtype=torch.float64) * time_scale).to(torch.float32).expand(n)
        args = [x_t.to(torch.float32).contiguous(), timesteps.contiguous()]
        if conditional:
            if labels is None and null_class is None:
                raise ValueError("this model needs a class label per sample")
            args.append(_map_labels(labels, n, null_class))
        return runner(*args).to(device=x_t.device, dtype=x_t.dtype)
    return replace(loaded.model, net=net)


def _meanflow_adapter(loaded, runner):
    null_class = loaded.entry.null_class

    def u(z, r, t, labels=None):
        n = z.shape[0]
        t32 = torch.as_tensor(t).to(torch.float32).expand(n)
        h = t32 - torch.as_tensor(r).to(torch.float32).expand(n)  # h = t - r in float32, as MeanFlowNet.u does
        out = runner(z.to(torch.float32).contiguous(), t32.contiguous(), h.contiguous(),
                     _map_labels(labels, n, null_class))
        return out.to(device=z.device, dtype=z.dtype)
    return replace(loaded.model, u=u)


class BackendMaskedLM:
    """A masked model whose logits come from a backend runner; tokenizer and ids from the torch loader."""

    def __init__(self, lm, runner):
        self._lm, self._runner = lm, runner

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def logits(self, tokens: torch.Tensor, cond=None) -> torch.Tensor:
        return self._runner(tokens.to(torch.int64).cpu().contiguous()).float()


def _masked_adapter(loaded, runner):
    return BackendMaskedLM(loaded.model, runner)


ADAPTERS = {"diffusion": _unet_adapter, "flow": _unet_adapter, "meanflow": _meanflow_adapter,
            "masked": _masked_adapter}

def apply_backend(loaded, device: str = "cpu"):
    """The LoadedModel with its network on the configured backend (or the first available fallback)."""
    opts = backend_options(loaded.entry)
    if opts.backend == "torch":
        return replace(loaded, backend="torch")
    errors = []
    for name in (opts.backend, *opts.fallback):
        if name == "torch":
            runner = None
        else:
            try:
                runner = BUILDERS[name](loaded.entry, opts, device)
                warm_up(runner)
            except BackendUnavailable as err:
                errors.append(str(err))
                continue
        if errors:
            log.warning("model %s: %s; using its configured fallback %r", loaded.name, "; ".join(errors), name)
        if runner is None:
            return replace(loaded, backend=f"torch (fallback: {opts.backend} unavailable)")
        model = ADAPTERS[loaded.kind](loaded, runner)
        return replace(loaded, model=model, backend=runner.description)
    raise BackendUnavailable(f"model {loaded.name!r}: " + "; ".join(errors)
                             + ("" if opts.fallback else " (no `fallback` is configured for this model)"))


def export_model(entry: ModelEntry, fmt: str, *, opset: int = DEFAULT_OPSET, fp16: bool = False,
                 max_batch: int = DEFAULT_MAX_BATCH, out_dir: Path | None = None) -> list[str]:
    """`diffserve export`: ONNX (always exported afresh) or a TensorRT engine built from it; report lines."""
    if fmt not in ("onnx", "tensorrt"):
        raise ExportError(f"format: {fmt!r} is not one of ['onnx', 'tensorrt']")
    if fmt == "tensorrt":
        from .tensorrt_engine import require_tensorrt
        require_tensorrt()  # fail before the export when there is nothing to build the engine with
    path, manifest = export_onnx(entry, out_dir=out_dir, opset=opset, fp16=fp16 and fmt == "onnx",
                                 max_batch=max_batch)
    inputs = ", ".join(f"{i['name']}{i['shape']} {i['dtype']}" for i in manifest["inputs"])
    lines = [f"{entry.name}: {path} ({path.stat().st_size / 1e6:.1f} MB, opset {opset}, {manifest['precision']}, "
             f"onnx.checker ok, max |onnx - torch| {manifest['verify_max_abs_diff']:.2g})",
             f"  inputs: {inputs}; manifest {path.with_suffix('.json').name}"]
    if fmt == "tensorrt":
        from .tensorrt_engine import engine_for

        cache_dir = Path(out_dir) / "engines" if out_dir is not None else backend_options(entry).engine_cache
        engine_path, built = engine_for(entry, path, manifest, fp16=fp16, max_batch=max_batch, cache_dir=cache_dir)
        lines.append(f"  tensorrt engine: {engine_path} ({'built' if built else 'cached, up to date'}; "
                     f"profile batch 1..{max_batch}{', fp16' if fp16 else ''})")
    return lines
