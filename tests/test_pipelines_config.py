"""Models-config entries for diffusers pipeline directories: detected kind, contradictions, dtype, device."""

import pytest
import torch

from models.config import ConfigError, load_config
from models.loading import load_model
from models.pipelines.generate import PipelineRequest, generate
from models.pipelines.pipeline import LatentPipeline
from tests.pipeline_fixtures import tiny_sd


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    tiny_sd(root / "sd")
    return root


def _config(root, body):
    path = root / "models.toml"
    path.write_text('model_roots = ["."]\n[[models]]\nname = "tiny-sd"\ndirectory = "sd"\n' + body)
    return path


def test_kind_is_detected_from_model_index(root):
    entry = load_config(_config(root, ""))["tiny-sd"]
    assert (entry.kind, entry.family, entry.dtype, entry.device) == ("diffusion", "sd", "float32", None)
    loaded = load_model(entry)
    assert isinstance(loaded.model, LatentPipeline) and loaded.model.family == "sd"


@pytest.mark.parametrize("kind", ["sd", "diffusion"])
def test_a_consistent_kind_is_accepted(root, kind):
    assert load_config(_config(root, f'kind = "{kind}"\n'))["tiny-sd"].family == "sd"


@pytest.mark.parametrize("kind", ["flow", "flux", "masked"])
def test_a_contradicting_kind_is_refused_before_any_weight_is_read(root, tmp_path, kind):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text((root / "sd" / "model_index.json").read_text())
    with pytest.raises(ConfigError, match=r"models\[0\]\.kind: .* contradicts"):
        load_config(_config(tmp_path, f'kind = "{kind}"\n'))  # no weights exist there at all


def test_kind_is_required_without_model_index(tmp_path):
    (tmp_path / "sd").mkdir()
    with pytest.raises(ConfigError, match=r"models\[0\]\.kind: required"):
        load_config(_config(tmp_path, ""))


@pytest.mark.parametrize("field,value", [("dtype", '"float64"'), ("device", '"gpu0"'), ("device", "3")])
def test_bad_dtype_and_device_are_refused(root, field, value):
    with pytest.raises(ConfigError, match=rf"models\[0\]\.{field}"):
        load_config(_config(root, f"{field} = {value}\n"))


def test_dtype_and_device_reach_the_loader(root):
    entry = load_config(_config(root, 'dtype = "bfloat16"\ndevice = "cpu"\n'))["tiny-sd"]
    pipeline = load_model(entry).model
    assert next(pipeline.decoder.vae.parameters()).dtype == torch.bfloat16
    result = generate(pipeline, PipelineRequest(seeds=[0], prompts=["a cat"], height=32, width=24, steps=2,
                                                guidance=3.0))
    assert result.images.dtype == torch.float32 and torch.isfinite(result.images).all()


def test_an_exported_backend_is_refused_for_a_pipeline(root):
    entry = load_config(_config(root, 'backend = "onnxruntime"\n'))["tiny-sd"]
    with pytest.raises(ConfigError, match="backend 'onnxruntime' is not available for latent pipelines"):
        load_model(entry)
