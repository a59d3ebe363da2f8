"""diffusers-format checkpoints load through our loader and equal a direct call of the diffusers module."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)

from models.config import ConfigError, load_config
from models.diffusers_loader import UnsupportedConfig, load_unet_denoiser, map_scheduler_config
from models.safety import UnsafeCheckpoint
from samplers.denoiser import NULL_LABEL
from samplers.processes import DiscreteVP, RectifiedFlow

# The google/ddpm-cifar10-32 layout (4 levels, attention at 16x16), downscaled in width.
CIFAR_STYLE = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                   block_out_channels=(16, 32, 32, 32),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
CLASS_COND = dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=8, num_class_embeds=11)


def _save(tmp_path, unet_config, scheduler, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DModel(**unet_config).eval()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    scheduler.save_pretrained(tmp_path / "scheduler")
    return unet


@pytest.mark.parametrize("scheduler,prediction", [
    (DDPMScheduler(prediction_type="epsilon", clip_sample=False), "eps"),  # clipping: test_pipelines_data_clip
    (DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear", clip_sample=False), "v"),
    (DPMSolverMultistepScheduler(prediction_type="sample", beta_schedule="squaredcos_cap_v2"), "x0"),
    (EulerDiscreteScheduler(), "eps"),
])
def test_cifar_style_unet_equals_the_diffusers_module(tmp_path, scheduler, prediction):
    unet = _save(tmp_path, CIFAR_STYLE, scheduler)
    model, _ = load_unet_denoiser(tmp_path)
    assert model.prediction == prediction and isinstance(model.process, DiscreteVP)
    assert model.shape == (3, 32, 32) and model.num_classes is None
    x_t = torch.randn(2, 3, 32, 32)
    t = torch.tensor([10.0, 700.0], dtype=torch.float64)
    with torch.no_grad():
        direct = unet(x_t, t.float()).sample
    assert torch.equal(model.net(x_t, t, None), direct)
    # Through the VE-coordinate contract: x0 from the direct output with the same alpha, sigma.
    alpha, sigma = (model.process.alpha(t).float().view(-1, 1, 1, 1), model.process.sigma(t).float().view(-1, 1, 1, 1))
    kappa = model.process.kappa(t)
    expected = {"eps": (x_t - sigma * direct) / alpha, "v": alpha * x_t - sigma * direct, "x0": direct}[prediction]
    assert torch.allclose(model(x_t / alpha, kappa), expected, atol=1e-4, rtol=1e-4)


def test_class_conditional_unet_and_null_label(tmp_path):
    unet = _save(tmp_path, CLASS_COND, DDPMScheduler())
    model, _ = load_unet_denoiser(tmp_path, null_class=10)
    assert model.num_classes == 10
    x_t, t = torch.randn(3, 1, 16, 16), torch.tensor([5.0, 50.0, 500.0], dtype=torch.float64)
    labels = torch.tensor([3, NULL_LABEL, 9])
    with torch.no_grad():
        direct = unet(x_t, t.float(), class_labels=torch.tensor([3, 10, 9])).sample
    assert torch.equal(model.net(x_t, t, labels), direct)


def test_flow_match_config_maps_to_rectified_flow(tmp_path):
    unet = _save(tmp_path, CLASS_COND, FlowMatchEulerDiscreteScheduler(shift=3.0))
    model, mapping = load_unet_denoiser(tmp_path, null_class=10)
    assert isinstance(model.process, RectifiedFlow) and model.prediction == "velocity" and mapping.shift == 3.0
    x_t, t = torch.randn(2, 1, 16, 16), torch.tensor([0.25, 0.75], dtype=torch.float64)
    with torch.no_grad():
        direct = unet(x_t, (t * 1000).float(), class_labels=torch.tensor([1, 2])).sample
    assert torch.equal(model.net(x_t, t, torch.tensor([1, 2])), direct)


def test_pickled_weights_are_refused_with_a_conversion_hint(tmp_path):
    unet = _save(tmp_path, CLASS_COND, DDPMScheduler())
    for f in (tmp_path / "unet").glob("*.safetensors"):
        f.unlink()
    torch.save(unet.state_dict(), tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match="safetensors only.*st.save_file"):
        load_unet_denoiser(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("prediction_type", "mystery", "'prediction_type'"),
    ("beta_schedule", "sigmoid", "'beta_schedule'"),
    ("_class_name", "KarrasVeScheduler", "'_class_name'"),
    ("rescale_betas_zero_snr", True, "'rescale_betas_zero_snr'"),
])
def test_unmappable_scheduler_fields_are_named(field, value, match):
    config = dict(DDPMScheduler().config, _class_name="DDPMScheduler")
    config[field] = value
    with pytest.raises(UnsupportedConfig, match=match):
        map_scheduler_config(config)


def test_loaded_weights_are_read_only_eval(tmp_path):
    _save(tmp_path, CLASS_COND, DDPMScheduler())
    model, _ = load_unet_denoiser(tmp_path, null_class=10)
    unet = model.net.__closure__  # the module lives in the network's closure
    modules = [c.cell_contents for c in unet if isinstance(c.cell_contents, torch.nn.Module)]
    assert modules and not modules[0].training
    assert not any(p.requires_grad for p in modules[0].parameters())


def test_models_config_refuses_directories_outside_the_roots(tmp_path):
    (tmp_path / "zoo" / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    cfg = tmp_path / "zoo" / "models.toml"
    cfg.write_text('model_roots = ["."]\n[[models]]\nname = "a"\ndirectory = "ok"\nkind = "diffusion"\n')
    assert load_config(cfg)["a"].directory == (tmp_path / "zoo" / "ok").resolve()
    cfg.write_text('[[models]]\nname = "b"\ndirectory = "../outside"\nkind = "diffusion"\n')
    with pytest.raises(ConfigError, match="not a model directory inside the configured model roots"):
        load_config(cfg)
    cfg.write_text('[[models]]\nname = "c"\ndirectory = "ok"\nkind = "gan"\n')
    with pytest.raises(ConfigError, match="models\\[0\\].kind"):
        load_config(cfg)
