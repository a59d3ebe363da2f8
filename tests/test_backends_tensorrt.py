"""TensorRT engines and ONNX Runtime's TensorRT / CUDA providers: run only where a GPU and tensorrt exist.

Tolerances (output scale = max(1, max |torch output|)): fp32 engines are built with TF32 off, so they
meet the CPU parity bound, max abs difference <= 1e-4 x scale, and 1e-3 after 10 sampler steps; fp16
engines 2e-2 x scale per forward and 5e-2 x scale after 10 steps (fp16 rounding compounds); ONNX Runtime's
CUDA EP (TF32 off) 1e-3, its TensorRT EP 1e-2 (it may build with TF32).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from models.config import load_config
from models.export import ensure_onnx
from models.loading import load_model
from server.generation import GenerateRequest, generate
from tests.backend_fixtures import KINDS, model_block, write_config, write_zoo
from tests.test_backends import _request, random_call


def _missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install 'diffserve[gpu]')"
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"TensorRT tests need a GPU: {_missing()}")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("trtzoo")
    write_zoo(root)
    blocks = [model_block(n) for n in KINDS]
    blocks += [model_block(n, "-trt", backend="tensorrt", max_batch=64) for n in KINDS]
    blocks += [model_block(n, "-trt16", backend="tensorrt", fp16=True, max_batch=64) for n in KINDS]
    return root, load_config(write_config(root, blocks))


@pytest.fixture(scope="module")
def loaded(zoo):
    _, entries = zoo
    return {name: load_model(entry) for name, entry in entries.items()}


def _scale(t: torch.Tensor) -> float:
    return max(1.0, float(t.abs().max()))


@pytest.mark.parametrize("name", list(KINDS))
@pytest.mark.parametrize("batch", [1, 7, 64, 100])  # 100: beyond the profile, split into pieces
def test_tensorrt_fp32_matches_torch(loaded, name, batch):
    assert loaded[name + "-trt"].backend.startswith("tensorrt ")
    want = random_call(KINDS[name], loaded[name].model, batch)
    got = random_call(KINDS[name], loaded[name + "-trt"].model, batch)
    assert (got - want).abs().max() <= 1e-4 * _scale(want)


@pytest.mark.parametrize("name", list(KINDS))
def test_tensorrt_fp16_within_its_documented_tolerance(loaded, name):
    want = random_call(KINDS[name], loaded[name].model, 16)
    got = random_call(KINDS[name], loaded[name + "-trt16"].model, 16)
    assert (got - want).abs().max() <= 2e-2 * _scale(want)


@pytest.mark.parametrize("name", list(KINDS))
def test_a_ten_step_sampler_run_on_tensorrt_matches_torch(loaded, name):
    want = generate(loaded[name], _request(name))
    got = generate(loaded[name + "-trt"], _request(name))
    if KINDS[name] == "masked":
        assert torch.equal(got.samples, want.samples)
    else:
        assert (got.samples - want.samples).abs().max() <= 1e-3
        half = generate(loaded[name + "-trt16"], _request(name))
        assert (half.samples - want.samples).abs().max() <= 5e-2 * _scale(want.samples)


def test_engine_cache_reuses_then_rebuilds_stale_and_corrupt_engines(zoo, tmp_path, monkeypatch, caplog):
    from models import tensorrt_engine as te

    _, entries = zoo
    entry = entries["digits-ddpm-trt"]
    onnx_path, manifest = ensure_onnx(entry)
    first, built = te.engine_for(entry, onnx_path, manifest, fp16=False, max_batch=8, cache_dir=tmp_path)
    assert built and first.is_file()
    again, built = te.engine_for(entry, onnx_path, manifest, fp16=False, max_batch=8, cache_dir=tmp_path)
    assert again == first and not built  # same ONNX, GPU and versions: loaded, not rebuilt
    real = te.library_versions
    monkeypatch.setattr(te, "library_versions", lambda: {**real(), "tensorrt": "0.0-other"})
    stale, built = te.engine_for(entry, onnx_path, manifest, fp16=False, max_batch=8, cache_dir=tmp_path)
    assert built and stale != first and not first.exists()  # a stale engine is rebuilt and removed
    monkeypatch.setattr(te, "library_versions", real)
    first, _ = te.engine_for(entry, onnx_path, manifest, fp16=False, max_batch=8, cache_dir=tmp_path)
    first.write_bytes(b"\x00" * 128)  # corrupt plan
    with caplog.at_level(logging.WARNING, logger="diffserve.tensorrt"):
        runner = te.TensorRTRunner.from_cache(entry, onnx_path, manifest, fp16=False, max_batch=8,
                                              cache_dir=tmp_path, device="cuda")
    assert runner.built and "does not match its record" in caplog.text


def test_export_cli_builds_a_tensorrt_engine(zoo, tmp_path, capsys):
    from server.cli import main

    root, _ = zoo
    assert main(["export", "--config", str(root / "models.toml"), "--model", "text-mdm", "--format", "tensorrt",
                 "--max-batch", "8", "--out-dir", str(tmp_path)]) == 0
    assert "tensorrt engine:" in capsys.readouterr().out and list((tmp_path / "engines").glob("*.plan"))


@pytest.mark.parametrize("provider", ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
def test_onnxruntime_gpu_providers_match_torch(zoo, loaded, provider, tmp_path):
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no {provider} (pip install onnxruntime-gpu)")
    _, entries = zoo
    entry = replace(entries["digits-ddpm"], extra={"backend": "onnxruntime", "providers": [provider],
                                                   "engine_cache": str(tmp_path)})
    gpu = load_model(entry)
    assert provider in gpu.backend
    tol = 1e-2 if provider == "TensorrtExecutionProvider" else 1e-3  # ORT's TensorRT EP may build with TF32
    for batch in (1, 7, 64):
        want = random_call("diffusion", loaded["digits-ddpm"].model, batch)
        assert (random_call("diffusion", gpu.model, batch) - want).abs().max() <= tol * _scale(want)
    request = GenerateRequest("dpmpp_2m", 10, n=4, seed=1, class_label=2)
    want = generate(loaded["digits-ddpm"], request).samples
    assert (generate(gpu, request).samples - want).abs().max() <= tol * _scale(want)
