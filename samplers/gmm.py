"""An isotropic Gaussian mixture whose denoiser and probability-flow ODE are known exactly.

With x0 ~ sum_k w_k N(mu_k, s_k^2 I) and x = x0 + sigma eps (VE coordinates), component k gives
x ~ N(mu_k, (s_k^2 + sigma^2) I) and E[x0 | x, k] = mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k), so the
denoiser, the score and the log-density are closed forms for any process and any condition (class k =
mixture component k).  Tests, benchmarks and the server's test models use it as ground truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .denoiser import NULL_LABEL, Denoiser
from .processes import Process

F64 = torch.float64


@dataclass(frozen=True)
class GaussianMixture:
    """means (K, *shape), stds (K,), weights (K,) summing to 1."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def _log_resp(self, x: torch.Tensor, sigma: torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """log responsibilities (B, K) and per-component variances (B, K) at noise level sigma."""
        flat = x.to(F64).flatten(1)
        mu = self.means.to(F64).flatten(1)
        var = self.stds.to(F64)[None] ** 2 + sigma.to(F64).reshape(-1, 1) ** 2
        dist2 = torch.cdist(flat, mu) ** 2
        dim = flat.shape[1]
        log_n = -0.5 * dist2 / var - 0.5 * dim * torch.log(2 * math.pi * var)
        log_prior = torch.log(self.weights.to(F64))[None].expand_as(log_n).clone()
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1)
            onehot = torch.nn.functional.one_hot(labels.clamp_min(0), self.num_classes).bool()
            onehot[labels == NULL_LABEL] = True
            log_prior = log_prior.masked_fill(~onehot, -math.inf)
        joint = log_n + log_prior
        return joint - torch.logsumexp(joint, dim=1, keepdim=True), var

    def log_density(self, x, sigma, labels=None) -> torch.Tensor:
        """log p_sigma(x) (of class `labels` when given), one value per sample."""
        sigma = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])
        flat = x.to(F64).flatten(1)
        var = self.stds.to(F64)[None] ** 2 + sigma.reshape(-1, 1) ** 2
        dist2 = torch.cdist(flat, self.means.to(F64).flatten(1)) ** 2
        log_n = -0.5 * dist2 / var - 0.5 * flat.shape[1] * torch.log(2 * math.pi * var)
        if labels is None:
            return torch.logsumexp(log_n + torch.log(self.weights.to(F64))[None], dim=1)
        return log_n.gather(1, torch.as_tensor(labels).reshape(-1, 1)).squeeze(1)

    def denoise(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """Exact E[x0 | x] at VE noise level sigma (per sample)."""
        sigma = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])
        log_r, var = self._log_resp(x, sigma, labels)
        shrink = self.stds.to(F64)[None] ** 2 / var  # (B, K)
        flat, mu = x.to(F64).flatten(1), self.means.to(F64).flatten(1)
        r = log_r.exp()
        out = (r[..., None] * (mu[None] + shrink[..., None] * (flat[:, None] - mu[None]))).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def ode_velocity(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """dx/dsigma = (x - D(x, sigma)) / sigma, written without the 0/0 at sigma = 0."""
        sigma = torch.as_tensor(sigma, dtype=F64).expand(x.shape[0])
        log_r, var = self._log_resp(x, sigma, labels)
        flat, mu = x.to(F64).flatten(1), self.means.to(F64).flatten(1)
        coef = log_r.exp() * sigma.reshape(-1, 1) / var
        return (coef[..., None] * (flat[:, None] - mu[None])).sum(1).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator, labels=None) -> torch.Tensor:
        if labels is None:
            labels = torch.multinomial(self.weights.to(F64), n, replacement=True, generator=generator)
        labels = torch.as_tensor(labels).reshape(-1)
        eps = torch.randn((n, *self.shape), generator=generator, dtype=F64)
        return self.means.to(F64)[labels] + self.stds.to(F64)[labels].reshape(-1, *[1] * len(self.shape)) * eps

    def network(self, process: Process, prediction: str = "eps"):
        """The exact model as a raw network net(x_t, t, labels) in `process`'s own coordinates."""
        def net(x_t, t, labels=None):
            t = torch.as_tensor(t, dtype=F64).expand(x_t.shape[0])
            shape = (-1, *[1] * (x_t.ndim - 1))
            alpha, sigma = process.alpha(t).reshape(shape), process.sigma(t).reshape(shape)
            x0 = self.denoise(x_t.to(F64) / alpha, (sigma / alpha).reshape(-1), labels)
            eps = (x_t.to(F64) - alpha * x0) / sigma
            out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "velocity": eps - x0}[prediction]
            return out.to(x_t.dtype)
        return net

    def denoiser(self, process: Process, prediction: str = "eps", conditional: bool = True) -> Denoiser:
        """The exact model wrapped by the ordinary adapter for `prediction`, as a served model would be."""
        return Denoiser(self.network(process, prediction), process, prediction, self.shape,
                        self.num_classes if conditional else None, kind="flow" if prediction == "velocity"
                        else "diffusion")

    def exact_ode(self, x: torch.Tensor, sigma_from: float, sigma_to: float = 0.0, labels=None,
                  rtol: float = 1e-10, atol: float = 1e-10) -> torch.Tensor:
        """Probability-flow ODE solution from x at sigma_from to sigma_to (scipy DOP853, tight tolerances)."""
        shape = x.shape

        def rhs(sigma, y):
            xt = torch.from_numpy(y).reshape(shape)
            return self.ode_velocity(xt, float(sigma), labels).reshape(-1).numpy()

        sol = solve_ivp(rhs, (float(sigma_from), float(sigma_to)), x.to(F64).reshape(-1).numpy(),
                        method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"exact ODE solve failed: {sol.message}")
        return torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)


def _mixture(shape: tuple[int, ...], components: int, seed: int, spread: float, std_range) -> GaussianMixture:
    g = np.random.default_rng(seed)
    means = g.uniform(-spread, spread, size=(components, *shape))
    stds = g.uniform(*std_range, size=components)
    weights = g.uniform(0.5, 1.5, size=components)
    return GaussianMixture(torch.tensor(means), torch.tensor(stds), torch.tensor(weights / weights.sum()))


def gmm_2d(seed: int = 0) -> GaussianMixture:
    """A 2-D mixture of 8 components (for pictures and quick tests)."""
    return _mixture((2,), 8, seed, 1.0, (0.05, 0.2))


def gmm_image(seed: int = 0) -> GaussianMixture:
    """A 64-D mixture of 10 components shaped like an 8x8 one-channel image (values about [-1, 1])."""
    return _mixture((1, 8, 8), 10, seed, 0.8, (0.1, 0.3))
