"""Evaluation of digits-t2i through diffusers' own StableDiffusionPipeline on the saved directory.

Every number comes from ``StableDiffusionPipeline.from_pretrained(dir)`` with its ``DPMSolverMultistepScheduler``
(defaults: 20 steps, guidance 4), per-sample generators seeded ``NOISE_SEED + k``. Generated 16x16 images are
reduced to the classifiers' 8x8 input by 2x2 averaging (exact on real digits, see :mod:`.data`); then
  * class acc: classifier B (held out; never used in training or to pick anything) agrees with the prompt's digit;
  * attribute acc: the measured attribute is on the prompt's side of the class median of the training digits
    ("bold": more ink than the median digit of its class); strict: in the named tercile / quartile, the same
    thresholds that wrote the training captions (a real digit chosen at random: 0.5 and 1/3 or 1/4);
  * digits-FD against the 359 held-out digits (the floor: as many class-balanced real training digits).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from training.digits_fd import _fd_scipy, features
from training.digits_t2i import data
from training.digits_t2i._compat import (
    Logger,
    balanced_real_subset,
    class_accuracy,
    frechet_distance,
    get_classifier_b,
    heldout_split,
    train_split,
)

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 4.0
GUIDANCES = (1.0, 2.0, 4.0, 7.5)
STEPS = (5, 10, 20)
NOISE_SEED = 1234
N_PER = 10  # samples per (digit, form): 10 x 5 x 10 = 500 (the eval costs ~12 minutes on a shared core)
FORMS = ("plain", "bold", "thin", "left", "right")
REPO = Path(__file__).resolve().parents[2]


def load_pipeline(path: Path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    negative: str | None = None,
    chunk: int = 500,
) -> torch.Tensor:
    """Images (N, 1, 16, 16) in [-1, 1]; sample k depends only on (prompt k, seed k)."""
    outs = []
    for i in range(0, len(prompts), chunk):
        ps = prompts[i : i + chunk]
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + chunk]]
        img = pipe(
            ps,
            negative_prompt=None if negative is None else [negative] * len(ps),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="pt",
        ).images
        outs.append(img * 2 - 1)
    return torch.cat(outs)


def form_prompt(label: int, form: str) -> str:
    thick = form if form in ("bold", "thin") else None
    lean = form if form in ("left", "right") else None
    return data.caption(label, thick, lean, style=0)


def prompt_set(forms=FORMS, n_per: int = N_PER) -> tuple[list[str], torch.Tensor, list[str], list[int]]:
    prompts, labels, fs = [], [], []
    for f in forms:
        for d in range(10):
            prompts += [form_prompt(d, f)] * n_per
            labels += [d] * n_per
            fs += [f] * n_per
    return prompts, torch.tensor(labels), fs, [NOISE_SEED + k for k in range(len(prompts))]


class Scorer:
    """Classifier B, digits-FD and the attribute measurements against the training digits' statistics."""

    def __init__(self, thresholds: dict) -> None:
        self.clf = get_classifier_b(REPO / "zoo" / "digit-classifier-b")
        self.thr = thresholds
        self.x_train, self.y_train = train_split()
        ink, sl = data.ink_mass(self.x_train), data.slant(self.x_train)
        self.ink_med = torch.stack([ink[self.y_train == c].median() for c in range(10)])
        self.slant_med = torch.stack([sl[self.y_train == c].median() for c in range(10)])
        self._heldout_features: torch.Tensor | None = None

    def attributes(self, x8: torch.Tensor, labels: torch.Tensor, forms: list[str]) -> dict:
        m = data.measure(x8, labels, self.thr)
        out = {}
        for f, sign, key, med in (
            ("bold", 1, "thickness", self.ink_med),
            ("thin", -1, "thickness", self.ink_med),
            ("right", 1, "lean", self.slant_med),
            ("left", -1, "lean", self.slant_med),
        ):
            sel = torch.tensor([g == f for g in forms])
            if not sel.any():
                continue
            val = m["ink" if key == "thickness" else "slant"][sel]
            side = sign * (val - med[labels[sel]]) > 0
            out[f] = {"acc": float(side.float().mean()), "strict": float((m[key][sel] == sign).float().mean())}
        return out

    def score(self, x16: torch.Tensor, labels: torch.Tensor, forms: list[str], fd: bool = True) -> dict:
        x8 = data.to_classifier(x16)
        with torch.no_grad():
            hit = (self.clf(x8).argmax(1) == labels).float()  # one classifier pass for every accuracy below
        row: dict = {"n": len(x8), "class_acc": float(hit.mean())}
        for f in dict.fromkeys(forms):
            sel = torch.tensor([g == f for g in forms])
            row[f"class_acc_{f}"] = float(hit[sel].mean())
        attrs = self.attributes(x8, labels, forms)
        if attrs:
            row["attributes"] = attrs
            row["attr_acc"] = sum(a["acc"] for a in attrs.values()) / len(attrs)
            row["attr_strict"] = sum(a["strict"] for a in attrs.values()) / len(attrs)
        if fd:
            row["fd"] = self.fd(x8)
        return row

    def fd(self, x8: torch.Tensor) -> float:
        """digits-FD to the held-out digits (frechet_distance's formula; their features computed once)."""
        if self._heldout_features is None:
            self._heldout_features = features(heldout_split()[0], self.clf)
        return _fd_scipy(features(x8, self.clf), self._heldout_features)

    def ink_quantile(self, x16: torch.Tensor, labels: torch.Tensor) -> float:
        return float(data.ink_quantile(data.to_classifier(x16), labels, self.x_train, self.y_train).mean())


def _rounded(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def sample_grid(pipe, path: Path) -> None:
    """Rows: digits 0-9; columns: "a seven" x2, "a bold seven" x2, "a thin seven" x2, slanted left, slanted right."""
    from PIL import Image

    cols = ["plain", "plain", "bold", "bold", "thin", "thin", "left", "right"]
    prompts = [form_prompt(d, f) for d in range(10) for f in cols]
    x = generate(pipe, prompts, [NOISE_SEED + k for k in range(len(prompts))])
    tiles = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    s, gap = 4, 4
    size = 16 * s
    img = Image.new("L", (len(cols) * (size + gap) + gap, 10 * (size + gap) + gap), 255)
    for k, t in enumerate(tiles):
        tile = Image.fromarray(t.numpy()).resize((size, size), Image.NEAREST)
        img.paste(tile, (gap + (k % len(cols)) * (size + gap), gap + (k // len(cols)) * (size + gap)))
    img.save(path)


def run(out: Path, quick: bool, log: Logger) -> dict:
    pipe = load_pipeline(out)
    if quick:
        x = generate(pipe, ["a bold seven", ""], [0, 1], steps=2)
        log(f"quick check: generated {tuple(x.shape)}, finite {bool(torch.isfinite(x).all())}")
        return {"shape": list(x.shape)}
    info = json.loads((out / "train_info.json").read_text())
    sc = Scorer(info["attribute_thresholds"])
    m: dict = {"defaults": {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "scheduler": "DPMSolverMultistep"}}
    prompts, labels, forms, seeds = prompt_set()

    def timed(name: str, fn):
        t0 = time.time()
        res = fn()
        log(f"{name} ({time.time() - t0:.0f} s): {_rounded(res)}")
        return res

    x_real, y_real = train_split()
    g = torch.Generator().manual_seed(99)
    m["floor"] = timed(
        "floor",
        lambda: {
            "n": len(prompts),
            "fd_real_n": sum(
                frechet_distance(balanced_real_subset(len(prompts), g), classifier=sc.clf)["fd"] for _ in range(3)
            )
            / 3,
            "real_train": sc.score(data.upsample(x_real), y_real, ["plain"] * len(y_real)),
        },
    )
    m["vae"] = timed("vae", lambda: vae_roundtrip(pipe, sc))
    m["guidance"] = {}
    for w in GUIDANCES:
        x = generate(pipe, prompts, seeds, guidance=w)
        m["guidance"][str(w)] = timed(f"guidance {w}", lambda x=x: sc.score(x, labels, forms))
    m["steps"] = {}
    for s in STEPS:
        if s == DEFAULT_STEPS:
            m["steps"][str(s)] = m["guidance"][str(DEFAULT_GUIDANCE)]
            continue
        x = generate(pipe, prompts, seeds, steps=s)
        m["steps"][str(s)] = timed(f"steps {s}", lambda x=x: sc.score(x, labels, forms))
    m["goal"] = timed("a bold seven", lambda: goal(pipe, sc))
    m["negative"] = timed("negative prompt", lambda: negative(pipe, sc))
    m["phrasings"] = timed("phrasings", lambda: phrasings(pipe, sc))
    m = _rounded(m)
    m["noise_seed"] = NOISE_SEED
    (out / "metrics.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    sample_grid(pipe, out / "samples.png")
    return m


@torch.no_grad()
def vae_roundtrip(pipe, sc: Scorer) -> dict:
    """The 1438 training digits through encode (posterior mean) -> decode: FD and classifier-B accuracy."""
    x, y = train_split()
    x16 = data.upsample(x)
    rec = pipe.vae.decode(pipe.vae.encode(x16).latent_dist.mean).sample.clamp(-1, 1)
    return {**sc.score(rec, y, ["plain"] * len(y)), "mse_16": float(((rec - x16) ** 2).mean())}


def goal(pipe, sc: Scorer, n: int = 100) -> dict:
    """The issue's target: "a bold seven" at the default steps and guidance."""
    labels = torch.full((n,), 7)
    x = generate(pipe, ["a bold seven"] * n, [NOISE_SEED + k for k in range(n)])
    return {**sc.score(x, labels, ["bold"] * n, fd=False), "ink_quantile": sc.ink_quantile(x, labels)}


def negative(pipe, sc: Scorer, n_per: int = 10) -> dict:
    """ "a seven" (every digit) with no negative prompt, with "bold" and with "thin" as the negative prompt."""
    prompts, labels, _, seeds = prompt_set(("plain",), n_per)
    out = {}
    for neg in (None, "bold", "thin"):
        x = generate(pipe, prompts, seeds, negative=neg)
        x8 = data.to_classifier(x)
        mes = data.measure(x8, labels, sc.thr)
        out[neg or "none"] = {
            "class_acc": class_accuracy(x8, labels, classifier=sc.clf),
            "ink_quantile": sc.ink_quantile(x, labels),
            "ink_mass": float(mes["ink"].mean()),
            "frac_bold": float((mes["thickness"] == 1).float().mean()),
            "frac_thin": float((mes["thickness"] == -1).float().mean()),
        }
    return {"n_per": n_per, "rows": out}


def phrasings(pipe, sc: Scorer, n_per: int = 10) -> dict:
    """Class accuracy of the other phrasings: "7", "the digit 7", "seven" (and "a seven" in the main set)."""
    out = {}
    for style, name in ((2, "7"), (1, "the digit 7"), (3, "seven")):
        prompts = [data.caption(d, None, None, style) for d in range(10) for _ in range(n_per)]
        labels = torch.arange(10).repeat_interleave(n_per)
        x = generate(pipe, prompts, [NOISE_SEED + k for k in range(len(prompts))])
        out[name] = class_accuracy(data.to_classifier(x), labels, classifier=sc.clf)
    return out


def balanced_prompts(n: int) -> tuple[list[str], torch.Tensor, list[str], list[int]]:
    """``bench quality``'s prompt set: sample k asks for digit k % 10 in form (k // 10 + k) % 5 and phrasing
    (k // 10) % 4, so every 10 samples cover the digits, every 50 every (digit, form) pair, and the four trained
    phrasings rotate ("a bold seven", "the digit 7, bold", "bold 7", "bold seven", each + ", slanted ...")."""
    prompts, labels, forms = [], [], []
    for k in range(n):
        digit, block = k % 10, k // 10
        form = FORMS[(block + digit) % len(FORMS)]
        thick = form if form in ("bold", "thin") else None
        lean = form if form in ("left", "right") else None
        prompts.append(data.caption(digit, thick, lean, style=block % 4))
        labels.append(digit)
        forms.append(form)
    return prompts, torch.tensor(labels), forms, [NOISE_SEED + k for k in range(n)]


@torch.no_grad()
def latent_bound(vae, factor: float = 2.0) -> float:
    """``factor`` x the largest |latent coordinate| of the 1438 training digits' encodings (posterior mean, times
    the VAE's scaling factor): the decoder never saw a latent beyond 1x, so a sample beyond 2x has diverged."""
    x, _ = train_split()
    z = vae.encode(data.upsample(x)).latent_dist.mean * vae.config.scaling_factor
    return factor * float(z.abs().max())


def diverged(latents: torch.Tensor, bound: float) -> torch.Tensor:
    """Per sample: any non-finite latent or any |coordinate| above ``bound``."""
    flat = latents.flatten(1)
    return ~torch.isfinite(flat).all(1) | (flat.abs().nan_to_num(float("inf")).amax(1) > bound)
