"""Processes, grids, adapters, guidance and the registry's handling of bad input."""

import math

import pytest
import torch

from samplers import REGISTRY, InvalidRequest, SampleNoise, make_grid, run_sampler, validate, with_guidance
from samplers.denoiser import NULL_LABEL
from samplers.gmm import gmm_image
from samplers.grids import GRIDS
from samplers.processes import VE, CosineVP, DiscreteVP, RectifiedFlow, beta_table

PROCESSES = [DiscreteVP.from_schedule("linear"), DiscreteVP.from_schedule("scaled_linear", 1000, 0.00085, 0.012),
             DiscreteVP.from_schedule("squaredcos_cap_v2"), CosineVP(), VE(), RectifiedFlow()]


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_lambda_inverse_round_trips(process):
    t = torch.linspace(process.t_min, process.t_max, 37, dtype=torch.float64)
    assert torch.allclose(process.t_of_lambda(process.lambda_(t)), t, rtol=1e-9, atol=1e-9)
    assert torch.allclose(process.kappa(t), process.sigma(t) / process.alpha(t))


def test_discrete_vp_matches_the_beta_table_at_integer_times():
    betas = beta_table("linear", 1000)
    abar = torch.cumprod(1 - torch.tensor(betas), 0)
    process = DiscreteVP(tuple(betas))
    t = torch.arange(0, 1000, 37, dtype=torch.float64)
    assert torch.allclose(process.alpha(t) ** 2, abar[t.long()], rtol=1e-12)
    mid = process.log_alpha(torch.tensor([10.5]))  # continuous interpolation between entries
    assert process.log_alpha(torch.tensor([10.0])) > mid > process.log_alpha(torch.tensor([11.0]))


@pytest.mark.parametrize("kind", sorted(GRIDS))
@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_grids_honour_the_time_range(kind, process):
    sigmas = make_grid(process, 7, kind, final_zero=False)
    assert len(sigmas) == 8 and (sigmas[1:] < sigmas[:-1]).all()
    assert math.isclose(sigmas[0], process.kappa_max, rel_tol=1e-9)
    assert math.isclose(sigmas[-1], process.kappa_min, rel_tol=1e-9)
    assert make_grid(process, 7, kind)[-1] == 0


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_adapters_give_the_same_denoiser(prediction):
    gmm, process = gmm_image(), CosineVP()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64) * 3
    sigma = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    out = gmm.denoiser(process, prediction)(x, sigma)
    assert torch.allclose(out, gmm.denoise(x, sigma), atol=1e-10)


def test_flow_velocity_adapter():
    gmm = gmm_image()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 9.0], dtype=torch.float64)
    assert torch.allclose(gmm.denoiser(RectifiedFlow(), "velocity")(x, sigma), gmm.denoise(x, sigma), atol=1e-10)


def test_guidance_is_one_batched_forward_and_matches_the_formula():
    gmm = gmm_image()
    calls = []
    base = gmm.denoiser(VE(), "x0")
    net = base.net

    def counting_net(x, t, labels):
        calls.append(x.shape[0])
        return net(x, t, labels)

    model = type(base)(counting_net, base.process, "x0", base.shape, base.num_classes)
    x, sigma = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    labels = torch.tensor([1, 4, NULL_LABEL])
    guided = with_guidance(model, 3.0)(x, sigma, labels)
    assert calls == [6]
    d_c, d_u = gmm.denoise(x, sigma.expand(3), labels), gmm.denoise(x, sigma.expand(3), None)
    assert torch.allclose(guided[:2], (d_u + 3 * (d_c - d_u))[:2], atol=1e-10)
    assert torch.allclose(guided[2], d_u[2], atol=1e-10)


def test_guidance_on_an_unconditional_model_is_refused():
    model = gmm_image().denoiser(VE(), "x0", conditional=False)
    with pytest.raises(InvalidRequest, match="unconditional"):
        with_guidance(model, 2.0)


@pytest.fixture
def model():
    return gmm_image().denoiser(DiscreteVP.from_schedule(), "eps")


@pytest.mark.parametrize("call,match", [
    (lambda m, x, s: run_sampler("nope", m, x, s), "unknown sampler 'nope'"),
    (lambda m, x, s: run_sampler("", m, x, s), "sampler: name is empty"),
    (lambda m, x, s: run_sampler("ddim", m, x, s, options={"eta": 2.0}), "'eta': 2.0 is above the maximum"),
    (lambda m, x, s: run_sampler("ddim", m, x, s, options={"eta": float("nan")}), "'eta': must be finite"),
    (lambda m, x, s: run_sampler("ddim", m, x, s, options={"etaa": 0.1}), "'etaa': not an option"),
    (lambda m, x, s: run_sampler("unipc", m, x, s, options={"order": 7}), "'order': 7 is above"),
    (lambda m, x, s: run_sampler("unipc", m, x, s, options={"variant": "bh3"}), "'variant'"),
    (lambda m, x, s: run_sampler("ddpm", m, x, s), "needs per-sample noise"),
    (lambda m, x, s: run_sampler("dpmpp_2m", m, x.fill_(float("nan")), s), "x: contains NaN"),
    (lambda m, x, s: run_sampler("dpmpp_2m", m, x, s * 10), "model's range"),
    (lambda m, x, s: run_sampler("dpmpp_2m", m, x, s.flip(0)), "strictly decrease"),
    (lambda m, x, s: run_sampler("dpmpp_2m", m, x, s[:1]), "steps: 0 is outside"),
])
def test_bad_input_is_a_clear_error(model, call, match):
    x = SampleNoise([0, 1]).randn((1, 8, 8)).double()
    with pytest.raises(InvalidRequest, match=match):
        call(model, x, make_grid(model.process, 5))


@pytest.mark.parametrize("steps", [0, -3, REGISTRY["dpmpp_2m"].max_steps + 1, 2.5, True])
def test_steps_out_of_range(steps):
    with pytest.raises(InvalidRequest, match="steps"):
        validate("dpmpp_2m", steps)
    if steps != REGISTRY["dpmpp_2m"].max_steps + 1:
        with pytest.raises(InvalidRequest, match="steps"):
            make_grid(VE(), steps)


def test_registry_metadata_is_complete():
    for name, spec in REGISTRY.items():
        assert spec.when_to_use and spec.fn.__doc__, name
        assert spec.fn.__doc__.strip(), name
        for key, option in spec.options.items():
            assert option.check(key, option.default) == option.default
    assert REGISTRY["heun"].nfe(5) == 9 and REGISTRY["dpmpp_2m"].nfe(10) == 10
