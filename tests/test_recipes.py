"""Tests for the digits zoo: recipes (quick modes), data split, MeanFlow JVP, shipped classifiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training import digits_data

ZOO = Path(__file__).resolve().parents[1] / "zoo"


# ---------------------------------------------------------------- data split


def test_split_is_disjoint_complete_and_stratified():
    tr, ho = digits_data.train_indices(), digits_data.heldout_indices()
    assert len(np.intersect1d(tr, ho)) == 0
    assert len(tr) + len(ho) == 1797
    assert sorted(np.concatenate([tr, ho]).tolist()) == list(range(1797))
    _, y_all = digits_data.all_digits()
    y_all = y_all.numpy()
    for c in range(10):
        n_c = int((y_all == c).sum())
        n_ho = int((y_all[ho] == c).sum())
        assert n_ho == round(0.2 * n_c), (c, n_ho, n_c)


def test_split_is_fixed():
    a = digits_data.heldout_indices()
    digits_data._split_indices.cache_clear()
    b = digits_data.heldout_indices()
    assert np.array_equal(a, b)
    assert digits_data.heldout_digest() == digits_data.HELDOUT_SHA256


def test_split_tensors():
    x, y = digits_data.train_split()
    xh, yh = digits_data.heldout_split()
    assert x.shape == (1438, 1, 8, 8) and xh.shape == (359, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert set(yh.tolist()) == set(range(10))


# ---------------------------------------------------------------- MeanFlow JVP


@pytest.mark.parametrize("scale, eps, tol", [(1000.0, 3e-5, 1e-2), (1.0, 1e-3, 1e-4)])
def test_meanflow_jvp_matches_finite_difference(scale, eps, tol):
    """du/dt = v . d_z u + d_t u (tangents (v, 1, 0) on (z, t, r)) vs a central difference along the path.

    diffusers' sinusoidal embedding casts the timestep to float32, which limits the finite difference for the
    shipped 1000 t input scale (about 1e-3 relative at best); with input scale 1 the check is much tighter.
    """
    from models.meanflow_net import MeanFlowNet
    from training.digits_meanflow import meanflow_dudt

    torch.manual_seed(0)
    net = MeanFlowNet(t_embed_scale=scale, h_embed_scale=scale).double()
    # give the zero-initialised h-branch non-trivial weights so d/dt also flows through h = t - r
    torch.nn.init.normal_(net.h_embedding.linear_2.weight, std=0.05)
    z = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    v = torch.randn_like(z)
    t = torch.tensor([0.9, 0.6, 0.4, 0.75], dtype=torch.float64)
    r = torch.tensor([0.1, 0.6, 0.05, 0.5], dtype=torch.float64)
    labels = torch.tensor([1, 10, 3, 7])
    with torch.no_grad():
        u, dudt = meanflow_dudt(net, z, t, r, v, labels)

        def f(s):  # u along (z + s v, t + s, r): the total t-derivative with dz/dt = v and r fixed
            return net(z + s * v, t + s, (t + s) - r, labels)

        fd = (f(eps) - f(-eps)) / (2 * eps)
        u_direct = net(z, t, t - r, labels)
        # a tangent-order mix-up ((v, 0, 1): d/dr instead of d/dt) must be caught by the same check
        _, wrong = torch.func.jvp(
            lambda z_, t_, r_: net(z_, t_, t_ - r_, labels),
            (z, t, r),
            (v, torch.zeros_like(t), torch.ones_like(r)),
        )
    assert torch.allclose(u, u_direct, atol=1e-10)
    rel = float((dudt - fd).norm() / fd.norm())
    assert rel < tol, rel
    assert float((wrong - fd).norm() / fd.norm()) > 10 * tol


def test_meanflow_tr_sampler_orders_t_and_r():
    from training.digits_meanflow import sample_tr

    torch.manual_seed(0)
    for kind in ("v1", "v0", "jax", "uniform"):
        t, r = sample_tr(4096, kind)
        assert bool((r <= t).all()) and bool((t <= 1).all()) and bool((r >= 0).all())
        eq = float((r == t).float().mean())
        assert 0.15 < eq < 0.85


# ---------------------------------------------------------------- quick modes


def _check_unet_dir(out: Path, flow: bool) -> None:
    from diffusers import UNet2DModel

    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin"))
    unet = UNet2DModel.from_pretrained(out / "unet").eval()
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 8
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([999.0, 500.0, 0.0]) if flow else torch.tensor([999, 500, 0])
    with torch.no_grad():
        y = unet(x, t, class_labels=torch.tensor([0, 9, 10])).sample
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_ddpm_quick(tmp_path):
    from diffusers import DDPMScheduler

    from training import digits_ddpm

    out = digits_ddpm.main(["--quick", "--out", str(tmp_path)])
    _check_unet_dir(out, flow=False)
    s = DDPMScheduler.from_pretrained(out / "scheduler")
    assert s.config.prediction_type == "epsilon" and s.config.beta_schedule == "linear"
    assert s.config.num_train_timesteps == 1000
    assert (out / "README.md").is_file() and (out / "metrics.json").is_file()


def test_flow_quick(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from training import digits_flow

    out = digits_flow.main(["--quick", "--out", str(tmp_path)])
    _check_unet_dir(out, flow=True)
    s = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    assert s.config.shift == 1.0 and s.config.num_train_timesteps == 1000


def test_meanflow_teacher_replaces_the_conditional_velocity(monkeypatch):
    """With a teacher, the target at r = t is the teacher's velocity, so a student equal to the teacher has
    zero loss there; with v = eps - x (no teacher) the same student does not."""
    from models.meanflow_net import MeanFlowNet
    from training import digits_meanflow

    torch.manual_seed(0)
    teacher = MeanFlowNet(t_embed_scale=1.0, h_embed_scale=1.0).eval()
    student = MeanFlowNet(t_embed_scale=1.0, h_embed_scale=1.0).eval()
    student.load_state_dict(teacher.state_dict())

    def r_equals_t(n, kind):
        t = torch.rand(n) * 0.9 + 0.05
        return t, t.clone()

    monkeypatch.setattr(digits_meanflow, "sample_tr", r_equals_t)
    x, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 10
    _, with_teacher = digits_meanflow.make_loss("v1", 1.0, 0.0, 0.75, teacher=teacher)(student, x, y)
    _, without = digits_meanflow.make_loss("v1", 1.0, 0.0, 0.75)(student, x, y)
    assert with_teacher["mse"] < 1e-10
    assert without["mse"] > 0.1


def test_meanflow_quick(tmp_path):
    import json

    from models.meanflow_net import load_meanflow_net
    from training import digits_meanflow
    from training.evaluate import load_for_eval, sample

    out = digits_meanflow.main(["--quick", "--out", str(tmp_path)])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    net = load_meanflow_net(out)
    assert not net.training
    assert net.t_embed_scale == 1.0 and net.h_embed_scale == 1.0  # from scratch: raw t, smooth du/dt
    z = torch.randn(4, 1, 8, 8)
    labels = torch.tensor([0, 3, 9, 10])
    u = net.u(z, torch.zeros(4), torch.ones(4), labels)
    assert u.shape == z.shape and torch.isfinite(u).all()
    # the card's numbers come from the served sampler: one NFE is z_0 = z_1 - u(z_1, 0, 1) on seeded noise
    loaded = load_for_eval(out, "meanflow")
    for nfe in (1, 2):
        x, lab, used = sample(loaded, "meanflow", nfe, None, 4, seed=5)
        assert used == nfe and x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    from samplers import SampleNoise

    z1 = SampleNoise(range(5, 9)).randn((1, 8, 8))
    with torch.no_grad():
        expected = z1 - net.u(z1, torch.zeros(4), torch.ones(4), torch.arange(4) % 10)
    torch.testing.assert_close(sample(loaded, "meanflow", 1, None, 4, seed=5)[0], expected)
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("meanflow", 1)]


def test_meanflow_quick_with_teacher(tmp_path):
    import json

    from training import digits_meanflow

    flow = ZOO / "digits-flow"
    _require(flow / "unet" / "diffusion_pytorch_model.safetensors")
    out = digits_meanflow.main(["--quick", "--out", str(tmp_path), "--teacher", str(flow)])
    info = json.loads((out / "train_info.json").read_text())
    assert info["teacher"] == str(flow) and info["train_steps"] == digits_meanflow.QUICK_STEPS
    assert "frozen teacher" in (out / "README.md").read_text()


def test_classifiers_quick(tmp_path):
    from models.classifiers import load_classifier
    from training import digit_classifiers

    root = digit_classifiers.main(["--quick", "--out", str(tmp_path)])
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    dims = {}
    for name in ("digit-classifier-a", "digit-classifier-b"):
        clf = load_classifier(root / name)
        logits = clf(x)
        assert logits.shape == (5, 10) and torch.isfinite(logits).all()
        dims[name] = clf.features(x).shape[1]
    assert dims == {"digit-classifier-a": 128, "digit-classifier-b": 64}


def test_fd_backends_agree_and_floor_is_small(tmp_path):
    from models.classifiers import DigitClassifierB
    from training.digits_fd import frechet_distance

    torch.manual_seed(0)
    clf = DigitClassifierB().eval()
    x, _ = digits_data.train_split()
    noise = torch.rand(500, 1, 8, 8) * 2 - 1
    pytest.importorskip("torchmetrics")
    a = frechet_distance(x[:500], classifier=clf, backend="torchmetrics")["fd"]
    b = frechet_distance(x[:500], classifier=clf, backend="scipy")["fd"]
    assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    c = frechet_distance(noise, classifier=clf, backend="scipy")["fd"]
    assert c > b


# ---------------------------------------------------------------- shipped zoo


def _require(path: Path) -> None:
    """The zoo's weights are tracked in git: a missing file is a broken checkout, not a reason to skip."""
    assert path.is_file(), f"{path} is missing (the zoo is tracked in git)"


@pytest.mark.parametrize("name", ["digit-classifier-a", "digit-classifier-b"])
def test_zoo_classifier_heldout_accuracy(name):
    d = ZOO / name
    _require(d / "model.safetensors")
    from models.classifiers import load_classifier

    clf = load_classifier(d)
    x, y = digits_data.heldout_split()
    with torch.no_grad():
        acc = float((clf(x).argmax(1) == y).float().mean())
    assert acc > 0.90, acc


def test_zoo_generative_models_load():
    from diffusers import UNet2DModel

    from models.meanflow_net import load_meanflow_net

    for name in ("digits-ddpm", "digits-flow"):
        d = ZOO / name / "unet"
        _require(d / "diffusion_pytorch_model.safetensors")
        unet = UNet2DModel.from_pretrained(d)
        assert unet.config.num_class_embeds == 11
    d = ZOO / "digits-meanflow"
    _require(d / "model.safetensors")
    net = load_meanflow_net(d)
    x = net(torch.randn(2, 1, 8, 8), torch.ones(2), torch.ones(2), torch.tensor([1, 10]))
    assert torch.isfinite(x).all()
