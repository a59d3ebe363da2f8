"""Compiled backends on the CPU: ONNX export, ONNX Runtime parity with torch, the engine on ORT, bad input.

Models are random stand-ins with the zoo's architectures (tests/backend_fixtures.py); the bundled zoo
models are checked too once zoo/models.toml lists them.
"""

from __future__ import annotations

import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from models.artifacts import BackendUnavailable, file_sha256
from models.backends import backend_options
from models.config import DEFAULT_CONFIG, ConfigError, load_config
from models.export import ensure_onnx, export_paths
from models.loading import load_model
from samplers.denoiser import NULL_LABEL
from server.cli import main as cli_main
from server.generation import GenerateRequest, generate
from tests.backend_fixtures import KINDS, SAMPLERS, model_block, write_config, write_zoo

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    write_zoo(root)
    blocks = [model_block(n) for n in KINDS]
    blocks += [model_block(n, "-ort", backend="onnxruntime", providers=CPU, export_dir="../cache/" + n) for n in KINDS]
    return root, load_config(write_config(root, blocks))


@pytest.fixture(scope="module")
def pairs(zoo):
    """name -> (torch LoadedModel, onnxruntime LoadedModel) for every zoo stand-in."""
    _, entries = zoo
    return {n: (load_model(entries[n]), load_model(entries[n + "-ort"])) for n in KINDS}


def random_call(kind: str, model, batch: int, seed: int = 0):
    """The served contract of `model` on random inputs: Denoiser.net, AverageVelocity, or masked logits."""
    g = torch.Generator().manual_seed(seed + batch)
    if kind == "masked":
        return model.logits(torch.randint(0, model.vocab_size, (batch, model.length), generator=g))
    x = torch.randn(batch, *model.shape, generator=g)
    labels = torch.randint(0, 10, (batch,), generator=g)
    labels[::3] = NULL_LABEL  # the null class goes through the label mapping
    t = torch.rand(batch, generator=g, dtype=torch.float64)
    if kind == "meanflow":
        return model(x, t * torch.rand(batch, generator=g, dtype=torch.float64), t, labels)
    return model.net(x, t * (999.0 if kind == "diffusion" else 1.0), labels)


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnxruntime_cpu_matches_torch(pairs, name, batch):
    torch_model, ort_model = pairs[name]
    assert ort_model.backend == "onnxruntime (CPUExecutionProvider)" and torch_model.backend == "torch"
    want, got = random_call(KINDS[name], torch_model.model, batch), random_call(KINDS[name], ort_model.model, batch)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() <= 1e-4


def _request(name: str, **kw) -> GenerateRequest:
    if KINDS[name] == "masked":
        return GenerateRequest(SAMPLERS[name], 10, n=4, seed=11, **kw)
    return GenerateRequest(SAMPLERS[name], 10, n=4, seed=11, class_label=3, **kw)


@pytest.mark.parametrize("name", list(KINDS))
def test_a_ten_step_sampler_run_matches_torch(pairs, name):
    torch_model, ort_model = pairs[name]
    want, got = generate(torch_model, _request(name)), generate(ort_model, _request(name))
    assert got.nfe == want.nfe and got.seeds == want.seeds
    if KINDS[name] == "masked":
        assert torch.equal(got.samples, want.samples) and got.texts == want.texts
    else:
        assert (got.samples - want.samples).abs().max() <= 1e-3


def test_guided_sampling_and_flow_samplers_on_meanflow_match_torch(pairs):
    torch_model, ort_model = pairs["digits-ddpm"]
    request = GenerateRequest("unipc", 10, n=3, seed=5, class_label=7, guidance=2.0)
    assert (generate(torch_model, request).samples - generate(ort_model, request).samples).abs().max() <= 1e-3
    torch_model, ort_model = pairs["digits-meanflow"]
    request = GenerateRequest("euler", 10, n=3, seed=5, class_label=1)  # u(z, t, t) as a flow velocity
    assert (generate(torch_model, request).samples - generate(ort_model, request).samples).abs().max() <= 1e-3


def test_the_engine_serves_an_onnxruntime_model_under_concurrent_requests_like_torch(pairs):
    from server.client import tensor_to_array
    from tests.server_fixtures import pb, running_server, stub_for

    torch_model, ort_model = pairs["digits-ddpm"]
    names = (torch_model.name, ort_model.name)  # "digits-ddpm", "digits-ddpm-ort"
    with running_server(dict(zip(names, (torch_model, ort_model))), max_batch=64) as srv:
        stub, channel = stub_for(srv)
        info = stub.GetModel(pb.GetModelRequest(name=ort_model.name))
        assert info.backend == "onnxruntime (CPUExecutionProvider)" and info.ready
        assert stub.GetModel(pb.GetModelRequest(name=torch_model.name)).backend == "torch"
        jobs = [dict(sampler=s, steps=n, base_seed=100 + k, num_samples=1 + k % 3, class_label=k % 10,
                     guidance=[1.0, 2.0][k % 2], format=pb.TENSOR)
                for k, (s, n) in enumerate([("dpmpp_2m", 6), ("euler", 4), ("unipc", 5), ("ddpm", 5)] * 4)]

        def run(args):
            model, job = args
            r = stub.Generate(pb.GenerateRequest(model=model, **job))
            return np.stack([tensor_to_array(s.tensor) for s in r.samples])

        with ThreadPoolExecutor(16) as pool:  # both models at once, every request batched with others
            results = list(pool.map(run, [(m, job) for job in jobs for m in names]))
        for want, got in zip(results[::2], results[1::2]):
            assert np.abs(want - got).max() <= 1e-3
        channel.close()


def test_export_cli_writes_a_checked_dynamic_batch_graph_and_manifest(zoo, tmp_path, capsys):
    root, _ = zoo
    out = tmp_path / "exported"
    rc = cli_main(["export", "--config", str(root / "models.toml"), "--model", "digits-meanflow", "--format", "onnx",
                   "--opset", "17", "--max-batch", "32", "--out-dir", str(out)])
    assert rc == 0 and "onnx.checker ok" in capsys.readouterr().out
    path, manifest_path = export_paths(out, fp16=False)
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["z", "t", "h", "class_labels"]
    assert all(i.type.tensor_type.shape.dim[0].dim_param == "batch" for i in graph.input)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["onnx_sha256"] == file_sha256(path) and manifest["max_batch"] == 32
    assert manifest["inputs"][0] == {"name": "z", "shape": ["batch", 1, 8, 8], "dtype": "float32"}
    assert manifest["inputs"][3]["dtype"] == "int64" and len(manifest["source_sha256"]) == 64


def test_exporting_an_unknown_model_is_a_clear_error(zoo, capsys):
    root, _ = zoo
    assert cli_main(["export", "--config", str(root / "models.toml"), "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no served model named 'nope'" in err and "digits-ddpm" in err and "Traceback" not in err


def test_a_corrupt_cached_onnx_file_is_detected_and_rebuilt(zoo, pairs, tmp_path, caplog):
    root, entries = zoo
    entry = replace(entries["digits-flow-ort"], extra={**entries["digits-flow-ort"].extra, "export_dir": str(tmp_path)})
    path, manifest = ensure_onnx(entry, out_dir=tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64  # a few flipped bytes inside the weights
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="diffserve.export"):
        loaded = load_model(entry)
    assert "is corrupt" in caplog.text
    assert json.loads(path.with_suffix(".json").read_text())["onnx_sha256"] == file_sha256(path)
    want = random_call("flow", pairs["digits-flow"][0].model, 7)
    assert (random_call("flow", loaded.model, 7) - want).abs().max() <= 1e-4
    path.write_bytes(b"not an onnx file")  # truncated, manifest gone too
    path.with_suffix(".json").unlink()
    assert load_model(entry).backend.startswith("onnxruntime")
    onnx.checker.check_model(str(path))
    manifest = json.loads(path.with_suffix(".json").read_text())
    path.write_bytes(b"garbage whose hash the manifest records")  # passes the hash check, fails to parse
    path.with_suffix(".json").write_text(json.dumps({**manifest, "onnx_sha256": file_sha256(path)}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffserve.backends"):
        loaded = load_model(entry)
    assert "onnxruntime cannot load" in caplog.text
    assert (random_call("flow", loaded.model, 7) - want).abs().max() <= 1e-4


def test_a_changed_checkpoint_is_exported_again(tmp_path):
    from tests.backend_fixtures import save_masked_lm

    save_masked_lm(tmp_path / "text-mdm", seed=0)
    entry = load_config(write_config(tmp_path, [model_block("text-mdm", backend="onnxruntime")]))["text-mdm"]
    first = ensure_onnx(entry)[1]
    assert ensure_onnx(entry)[1] == first  # intact and current: reused
    save_masked_lm(tmp_path / "text-mdm", seed=1)
    second = ensure_onnx(entry)[1]
    assert second["source_sha256"] != first["source_sha256"] and second["onnx_sha256"] != first["onnx_sha256"]


def _entry(zoo, name="digits-ddpm", **options):
    _, entries = zoo
    return replace(entries[name], extra={"export_dir": f"../cache/{name}", **options})


def test_a_backend_that_is_not_installed_is_a_clear_error(zoo, monkeypatch):
    try:
        import tensorrt  # noqa: F401
        has_trt = torch.cuda.is_available()
    except ImportError:
        has_trt = False
    if not has_trt:
        with pytest.raises(BackendUnavailable, match=r"backend 'tensorrt'.*(not installed.*diffserve\[gpu\]|no CUDA)"):
            load_model(_entry(zoo, backend="tensorrt"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the package were absent
    with pytest.raises(BackendUnavailable, match="onnxruntime package is not installed.*no `fallback`"):
        load_model(_entry(zoo, backend="onnxruntime"))


def test_a_provider_that_is_not_available_is_named(zoo):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider is not available.*CPUExecutionProvider"):
        load_model(_entry(zoo, backend="onnxruntime", providers=["CUDAExecutionProvider"]))


def test_a_configured_fallback_is_used_and_reported(zoo, caplog):
    with caplog.at_level(logging.WARNING, logger="diffserve.backends"):
        loaded = load_model(_entry(zoo, "text-mdm", backend="tensorrt", fallback=["onnxruntime"], providers=CPU))
    try:
        import tensorrt  # noqa: F401
        if torch.cuda.is_available():
            pytest.skip("tensorrt works here: nothing to fall back from")
    except ImportError:
        pass
    assert loaded.backend == "onnxruntime (CPUExecutionProvider)" and "fallback 'onnxruntime'" in caplog.text
    loaded = load_model(_entry(zoo, "text-mdm", backend="tensorrt", fallback=["torch"]))
    assert loaded.backend == "torch (fallback: tensorrt unavailable)"


def test_default_providers_take_what_the_installed_onnxruntime_offers(zoo):
    import onnxruntime as ort

    loaded = load_model(_entry(zoo, "text-mdm", backend="onnxruntime"))
    offered = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
    assert loaded.backend.startswith("onnxruntime (") and "CPUExecutionProvider" in loaded.backend
    if not offered:
        assert loaded.backend == "onnxruntime (CPUExecutionProvider)"


def test_serve_refuses_to_start_when_a_backend_is_missing(zoo, tmp_path, capsys):
    root, _ = zoo
    cfg = write_config(root, [model_block("text-mdm", backend="tensorrt")], "missing_backend.toml")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    assert cli_main(["serve", "--config", str(cfg), "--port", "0", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert "backend 'tensorrt'" in err and "text-mdm" in err


@pytest.mark.parametrize("options,match", [
    (dict(backend="tvm"), "backend: 'tvm' is not one of"),
    (dict(backend="onnxruntime", fallback=["gpu"]), "fallback: 'gpu'"),
    (dict(backend="onnxruntime", providers="CPUExecutionProvider"), "providers: expected a list"),
    (dict(fp16=True), "fp16: applies to"),
    (dict(backend="tensorrt", max_batch=0), "max_batch: expected an integer >= 1"),
])
def test_bad_backend_settings_name_the_field(zoo, options, match):
    with pytest.raises(ConfigError, match=match):
        backend_options(_entry(zoo, **options))


def test_fp16_onnx_runs_on_cpu_within_the_documented_tolerance(zoo, pairs):
    loaded = load_model(_entry(zoo, "digits-meanflow", backend="onnxruntime", providers=CPU, fp16=True))
    want = random_call("meanflow", pairs["digits-meanflow"][0].model, 7)
    got = random_call("meanflow", loaded.model, 7)
    assert (got - want).abs().max() <= 1e-2 * max(1.0, float(want.abs().max()))


def _zoo_entries():
    try:
        entries = load_config(DEFAULT_CONFIG)
    except (ConfigError, OSError):
        return [pytest.param(None, marks=pytest.mark.skip(reason="zoo/models.toml does not list the zoo yet"))]
    return [pytest.param(e, id=e.name) for e in entries.values() if e.family is None]  # pipelines: torch only


@pytest.mark.parametrize("entry", _zoo_entries())
def test_every_zoo_model_on_onnxruntime_matches_torch(entry, tmp_path):
    ort_entry = replace(entry, extra={**entry.extra, "backend": "onnxruntime", "providers": CPU,
                                      "export_dir": str(tmp_path)})
    torch_model, ort_model = load_model(replace(entry, extra={})), load_model(ort_entry)
    for batch in (1, 7, 64):
        want, got = random_call(entry.kind, torch_model.model, batch), random_call(entry.kind, ort_model.model, batch)
        assert (got - want).abs().max() <= 1e-4
    steps = None if entry.default_sampler == "first_hitting" else 10
    request = GenerateRequest(entry.default_sampler, steps, n=4, seed=3)
    want, got = generate(torch_model, request), generate(ort_model, request)
    if entry.kind == "masked":
        assert torch.equal(got.samples, want.samples)
    else:
        assert (got.samples - want.samples).abs().max() <= 1e-3


def test_torch_compile_backend_wiring(zoo, pairs, monkeypatch):
    """torch-compile through dynamo with dynamic batch; the aot_eager backend stands in for inductor, whose C++
    build takes minutes per graph on a CI CPU (inductor itself runs in `python -m bench backends`)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real(module, backend="aot_eager", **kw))
    loaded = load_model(_entry(zoo, "digits-flow", backend="torch-compile"))
    assert loaded.backend == "torch-compile (inductor, dynamic batch)"
    for batch in (1, 7, 64):
        want = random_call("flow", pairs["digits-flow"][0].model, batch)
        assert (random_call("flow", loaded.model, batch) - want).abs().max() <= 1e-4


def test_a_torch_compile_failure_is_unavailable_not_a_crash(zoo, monkeypatch):
    def broken(module, **kw):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(BackendUnavailable, match="torch-compile.*no working C\\+\\+ compiler"):
        load_model(_entry(zoo, "digits-flow", backend="torch-compile"))
    fallback = load_model(_entry(zoo, "digits-flow", backend="torch-compile", fallback=["torch"]))
    assert fallback.backend == "torch (fallback: torch-compile unavailable)"


def test_tensorrt_engine_cache_is_keyed_by_gpu_and_versions_and_rebuilds_stale_engines(zoo, tmp_path, monkeypatch):
    """The cache logic of models/tensorrt_engine.py with the builder stubbed (the real build needs a GPU)."""
    from models import tensorrt_engine as te

    _, entries = zoo
    entry = entries["text-mdm-ort"]
    _, manifest = ensure_onnx(entry)
    builds = []
    monkeypatch.setattr(te, "require_tensorrt", lambda: None)
    monkeypatch.setattr(te, "build_engine", lambda *args: builds.append(1) or b"plan %d" % len(builds))
    monkeypatch.setattr(te, "gpu_model", lambda index=0: "FakeGPU sm90")
    shapes = te.profile_shapes(manifest, 32)
    assert shapes == {"input_ids": ((1, 1), (16, 24), (32, 24))}  # batch 1..max, length 1..max_length

    def engine():
        return te.engine_for(entry, None, manifest, fp16=False, max_batch=32, cache_dir=tmp_path)
    first, built = engine()
    assert built and engine() == (first, False) and len(builds) == 1  # reused while nothing changed
    real = te.library_versions
    monkeypatch.setattr(te, "library_versions", lambda: {**real(), "tensorrt": "99.0"})
    upgraded, built = engine()
    assert built and upgraded != first and not first.exists()  # a library upgrade: rebuilt, stale one removed
    monkeypatch.setattr(te, "gpu_model", lambda index=0: "OtherGPU sm80")
    moved, built = engine()
    assert built and moved != upgraded and [p.name for p in tmp_path.glob("*.plan")] == [moved.name]
    moved.write_bytes(b"corrupt")  # a plan that no longer matches its record is rebuilt
    assert engine() == (moved, True) and moved.read_bytes() == b"plan 4"
    assert te.engine_for(entry, None, manifest, fp16=True, max_batch=32, cache_dir=tmp_path)[1]  # fp16: own engine


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary_behind(tmp_path):
    from models.artifacts import atomic_write

    path = tmp_path / "network.json"
    atomic_write(path, b"old")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # the write fails: the old file stays whole
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["network.json"]
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
