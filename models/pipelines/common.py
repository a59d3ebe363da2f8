"""What every latent pipeline family shares: component checks, the latent denoiser, prompt guidance, the VAE.

A family module reads a diffusers pipeline directory once and returns a `LatentPipeline`: a conditioning
stage (plain-Python tokenization + a batchable `encode` network), a `LatentDenoiser` in our contract
(``model(x, sigma, cond) -> x0_hat`` in VE coordinates, ``cond`` a dict of per-sample tensors) and a
batchable `decode` network (latents -> images in [-1, 1]).  Every network is split into a `NetworkCall`
(samplers/calls.py) so the engine can batch requests with different prompts into one forward pass.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from samplers.calls import NetworkCall, evaluate
from samplers.denoiser import NEG, PREDICTIONS, cat_cond, guidance_halves
from samplers.processes import Process

from ..diffusers_loader import UnsupportedConfig
from ..safety import require_safetensors


def read_model_index(directory: Path) -> dict:
    path = Path(directory) / "model_index.json"
    if not path.is_file():
        raise UnsupportedConfig("model_index.json: missing; not a diffusers pipeline directory")
    return json.loads(path.read_text())


def component_class(index: dict, name: str) -> str | None:
    """The class name model_index.json gives component `name` (None when absent or null)."""
    value = index.get(name)
    if not isinstance(value, list) or len(value) != 2 or value[1] is None:
        return None
    return str(value[1])


def check_components(directory: Path, index: dict, allowed: dict[str, tuple[str, ...]], model: str,
                     weights: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Refuse unsupported component classes and pickle-only weights, naming the component; never load code."""
    found = {}
    for name, classes in allowed.items():
        cls = component_class(index, name)
        if cls is None:
            if name in optional:
                found[name] = None
                continue
            raise UnsupportedConfig(f"model {model!r}: component {name!r} is missing from model_index.json")
        if cls not in classes:
            raise UnsupportedConfig(f"model {model!r}: component {name!r} has class {cls!r}, which diffserve "
                                    f"does not load (supported: {', '.join(classes)})")
        if name in weights:
            require_safetensors(Path(directory) / name, f"model {model!r}: component {name!r}")
        found[name] = cls
    return found


def weight_variant(folder: Path) -> str | None:
    """'fp16' when the folder holds only fp16-variant safetensors (`*.fp16.safetensors`), else None."""
    names = [p.name for p in Path(folder).glob("*.safetensors")]
    return "fp16" if names and all(".fp16" in n for n in names) else None


def load_component(cls, directory: Path, name: str, dtype: torch.dtype, device: str):
    """from_pretrained with safetensors only and local files only (fp16 variants too); eval, no gradients."""
    folder = Path(directory) / name
    module = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, torch_dtype=dtype,
                                 variant=weight_variant(folder))
    return module.to(device).eval().requires_grad_(False)


def load_tokenizer(cls, directory: Path, name: str):
    return cls.from_pretrained(Path(directory) / name, local_files_only=True)


class EmbeddingCache:
    """Bounded LRU of per-prompt conditioning rows (dict of tensors without the batch axis); thread-safe."""

    def __init__(self, size: int = 64):  # SD3's rows are ~5 MB each (333 x 4096 floats)
        self.size = size
        self._rows: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            row = self._rows.get(key)
            if row is not None:
                self._rows.move_to_end(key)
            return row

    def put(self, key, row: dict) -> None:
        with self._lock:
            self._rows[key] = row
            self._rows.move_to_end(key)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def __len__(self) -> int:
        return len(self._rows)


def stack_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def split_rows(batch: dict[str, torch.Tensor]) -> list[dict]:
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i].clone() for k, v in batch.items()} for i in range(n)]  # compact: no view of the batch


@dataclass(frozen=True, eq=False)
class TextConditioner:
    """Prompt -> per-sample conditioning: `tokenize` in plain Python, `encode(tokens)` one batched network."""

    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]
    encode: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    cache: EmbeddingCache = field(default_factory=EmbeddingCache)

    def encode_call(self, prompts: list[str]) -> NetworkCall:
        """The batchable text-encoder call for `prompts` (rows of token ids), finished into rows on CPU."""
        return NetworkCall(self.encode, (self.tokenize(list(prompts)),), split_rows)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True, eq=False)
class LatentDenoiser:
    """Data prediction over latents in VE coordinates, around `net(x_t, timestep, cond) -> raw output`.

    `net` is the batchable transformer / UNet call in its own coordinates (timestep = time_scale * t);
    `finish` converts its eps / v / flow velocity to x0 (samplers/denoiser.py's adapters).  `latent_shape`
    gives one sample's latent shape for an image size; `kind` is "diffusion" or "flow"."""

    net: Callable
    process: Process
    prediction: str
    latent_shape: Callable[[int, int], tuple[int, ...]]
    kind: str = "diffusion"
    time_scale: float = 1.0
    shape: tuple[int, ...] | None = None  # the default size's latent shape
    num_classes: int | None = None
    data_clip: Callable[[torch.Tensor], torch.Tensor] | None = None  # the scheduler's clip_sample / thresholding

    @property
    def sigma_min(self) -> float:
        return self.process.kappa_min

    @property
    def sigma_max(self) -> float:
        return self.process.kappa_max

    def network_call(self, x: torch.Tensor, sigma, cond=None) -> NetworkCall:
        """The raw network on x_t = alpha x at t(sigma), the parameterization adapter to x0, the data clip."""
        return self._clipped(self.prediction_call(x, sigma, cond))

    def prediction_call(self, x: torch.Tensor, sigma, cond=None) -> NetworkCall:
        """x0_hat before the data clip (what guidance combines before clipping, as diffusers' schedulers do)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        t = self.process.t_of_kappa(sigma)
        return self._call(x * _bcast(self.process.alpha(t), x), t, cond, x.dtype)

    def prior_call(self, noise: torch.Tensor, cond=None, clip: bool = True) -> NetworkCall:
        """x0_hat from pure noise at t = 1 of a rectified flow (kappa = inf), where VE coordinates end."""
        call = self._call(noise, torch.ones(noise.shape[0], dtype=torch.float64), cond, noise.dtype)
        return self._clipped(call) if clip else call

    def guided(self, scale: float, rescale: float = 0.0) -> PromptGuidance:
        """This denoiser under prompt guidance (what a request with guidance > 1 samples)."""
        return PromptGuidance(self, scale, rescale)

    def _clipped(self, call: NetworkCall) -> NetworkCall:
        return call if self.data_clip is None else call.then(self.data_clip)

    def _call(self, x_t, t, cond, dtype) -> NetworkCall:
        alpha, sig = _bcast(self.process.alpha(t), x_t), _bcast(self.process.sigma(t), x_t)
        to_x0 = PREDICTIONS[self.prediction]
        own = {k: v for k, v in (cond or {}).items() if not k.startswith(NEG)}
        timestep = (t * self.time_scale).to(torch.float32)
        return evaluate(self.net, x_t.to(torch.float32), timestep, own).then(
            lambda out: to_x0(x_t, out.to(dtype), alpha, sig, self.process))

    def __call__(self, x, sigma, cond=None):
        return self.network_call(x, sigma, cond).run()


@dataclass(frozen=True, eq=False)
class PromptGuidance:
    """Classifier-free guidance over prompts (Ho & Salimans 2022, eq. 6): D_u + w (D_c - D_u).

    The unconditional half uses the negative-prompt entries (``neg.*`` keys of cond); both halves run as
    one batched network call, [cond | uncond] on the batch axis.  In data prediction this equals
    diffusers' guidance on eps / v / velocity, since every adapter is affine in the network output."""

    model: LatentDenoiser
    scale: float
    rescale: float = 0.0  # guidance_rescale (SD / SDXL): 0 = plain CFG

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _both(self, x, cond):
        return torch.cat([x, x]), cat_cond(*guidance_halves(cond))

    def _combine(self, out):
        d_cond, d_uncond = out.chunk(2)
        return d_uncond + self.scale * (d_cond - d_uncond)

    def network_call(self, x, sigma, cond) -> NetworkCall:
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        xx, both = self._both(x, cond)
        call = self.model.prediction_call(xx, torch.cat([sigma, sigma]), both)
        guided = call.then(lambda out: self._rescaled(x, sigma, out)) if self.rescale else call.then(self._combine)
        return self.model._clipped(guided)

    def _rescaled(self, x, sigma, out):
        """Guidance rescale (Lin et al. 2024, "Common diffusion noise schedules...", eq. 15-16, diffusers'
        rescale_noise_cfg) on the network's own output (eps or v): the guided output scaled to the per-sample
        std of the conditional one, mixed by `rescale`.  The output is recovered from x0_hat through the
        adapter, affine per sample: x0 = base + slope * output."""
        d_cond, d_uncond = out.chunk(2)
        t = self.model.process.t_of_kappa(sigma)
        x_t = x * _bcast(self.model.process.alpha(t), x)
        alpha, sig = _bcast(self.model.process.alpha(t), x), _bcast(self.model.process.sigma(t), x)
        to_x0 = PREDICTIONS[self.model.prediction]
        base = to_x0(x_t, torch.zeros_like(x), alpha, sig, self.model.process)
        slope = to_x0(torch.zeros_like(x), torch.ones_like(x), alpha, sig, self.model.process)
        o_cond, o_uncond = (d_cond - base) / slope, (d_uncond - base) / slope
        o_cfg = o_uncond + self.scale * (o_cond - o_uncond)
        dims = list(range(1, x.ndim))
        ratio = o_cond.std(dim=dims, keepdim=True) / o_cfg.std(dim=dims, keepdim=True)
        o_cfg = self.rescale * o_cfg * ratio + (1 - self.rescale) * o_cfg
        return base + slope * o_cfg

    def prior_call(self, noise, cond) -> NetworkCall:
        xx, both = self._both(noise, cond)
        return self.model._clipped(self.model.prior_call(xx, both, clip=False).then(self._combine))

    def __call__(self, x, sigma, cond=None):
        return self.network_call(x, sigma, cond).run()


@dataclass(frozen=True, eq=False)
class VaeDecoder:
    """latents -> images in [-1, 1]: the VAE decoder on latents / scaling_factor + shift_factor."""

    vae: torch.nn.Module
    scaling_factor: float
    shift_factor: float = 0.0
    dtype: torch.dtype = torch.float32  # float32 where the family's VAE needs the upcast

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """The batchable decode network (the decoder object itself, so calls group by identity)."""
        return self.unclamped(latents).clamp(-1, 1)

    def unclamped(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(torch.float32) / self.scaling_factor + self.shift_factor
        device = next(self.vae.parameters()).device
        with torch.inference_mode():
            image = self.vae.decode(z.to(device=device, dtype=self.dtype)).sample
        return image.float().cpu()

    def decode_call(self, latents: torch.Tensor, size: tuple[int, int] | None = None) -> NetworkCall:
        """Decode; with `size` (resolution binning) the decoded image is resized and center-cropped to it
        before the clamp to [-1, 1], as diffusers resizes the raw decoder output."""
        if size is None:
            return NetworkCall(self, (latents.to(torch.float32),))
        return NetworkCall(self.unclamped, (latents.to(torch.float32),)).then(
            lambda images: resize_and_crop(images, *size).clamp(-1, 1))


def resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale (bilinear, half-pixel centers) until the image covers height x width, then crop the center."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    rh, rw = int(h * scale), int(w * scale)
    images = torch.nn.functional.interpolate(images, size=(rh, rw), mode="bilinear", align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    return images[..., top:top + height, left:left + width]


def vae_decoder(vae, dtype: torch.dtype) -> VaeDecoder:
    """The VAE's decode stage; float16 VAEs with `force_upcast` run in float32 (SDXL's overflow fix)."""
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae = vae.to(torch.float32)
    shift = getattr(vae.config, "shift_factor", None)
    return VaeDecoder(vae, float(vae.config.scaling_factor), float(shift or 0.0),
                      torch.float32 if upcast else dtype)


def flow_prior_step(x0_hat: torch.Tensor, noise: torch.Tensor, kappa_next: float) -> torch.Tensor:
    """The first step from pure noise (t = 1) to kappa_next in VE coordinates: x = D + kappa_next eps.

    At t = 1 the state is the noise itself, so eps_hat = noise and every first-order solver (Euler, DDIM,
    DPM-Solver's first step) lands here exactly."""
    if math.isinf(kappa_next):
        raise ValueError("the step after the prior must have a finite noise level")
    return x0_hat + kappa_next * noise
