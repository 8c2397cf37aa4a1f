"""An analytic diffusion model: a Gaussian-mixture data law whose eps-prediction is exact.

The data law is p(x0) = sum_j w_j N(mu_j, s_j^2 I). Under the DDPM forward process
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the marginal is again a mixture,
p_t(x) = sum_j w_j N(sqrt(abar_t) mu_j, v_j I) with v_j = abar_t s_j^2 + 1 - abar_t, so the
optimal noise prediction is closed form:
    eps*(x, t) = -sqrt(1 - abar_t) grad log p_t(x) = sqrt(1 - abar_t) sum_j r_j(x) (x - sqrt(abar_t) mu_j) / v_j
with r_j(x) the posterior responsibilities. A sampler that is exact in the limit of many steps
must then reproduce the data law's moments, which the tests check. For rectified flow
(x_t = (1 - t) x0 + t x1) the same mixture gives the exact velocity E[x1 - x0 | x_t] (velocity()).

It has CompVis's model interface (apply_model, alphas_cumprod, num_timesteps, parameterization),
and class labels: c = j conditions on mode j, c = n_modes (the null class) does not condition.
"""

from __future__ import annotations

import math

import torch

from ddim_gmm_exp.images import to_uint8
from ddim_gmm_exp.models.base import ModelAdapter


def linear_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """abar_t of DDPM's linear beta schedule, in float64."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


class ToyGMMModel(torch.nn.Module):
    """Exact eps-predictor of an isotropic Gaussian-mixture data law, on sample shape ``shape``."""

    parameterization = "eps"

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: torch.Tensor,
        shape: tuple[int, ...],
        num_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        dim = math.prod(shape)
        if means.shape[1] != dim:
            raise ValueError(f"means have dimension {means.shape[1]} but shape {shape} has D = {dim}")
        self.shape = tuple(shape)
        self.num_timesteps = num_timesteps
        self.register_buffer("means", means.double())
        self.register_buffer("stds", stds.double())
        self.register_buffer("weights", (weights / weights.sum()).double())
        self.register_buffer("alphas_cumprod", linear_alphas_cumprod(num_timesteps))

    @classmethod
    def random(
        cls, shape: tuple[int, ...] = (1, 4, 4), n_modes: int = 3, seed: int = 0, separation: float = 2.0
    ) -> ToyGMMModel:
        """A mixture of ``n_modes`` modes with random means of norm ~ separation, stds in [0.2, 0.5]."""
        g = torch.Generator().manual_seed(seed)
        dim = math.prod(shape)
        means = torch.randn(n_modes, dim, generator=g, dtype=torch.float64)
        means = separation * means / means.norm(dim=1, keepdim=True)
        stds = 0.2 + 0.3 * torch.rand(n_modes, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(n_modes, generator=g, dtype=torch.float64)
        return cls(means, stds, weights, shape)

    @property
    def n_modes(self) -> int:
        return self.means.shape[0]

    @property
    def device(self) -> torch.device:
        return self.means.device

    def mean(self) -> torch.Tensor:
        """E[x0] = sum_j w_j mu_j, flat (D,)."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x0] = sum_j w_j (s_j^2 I + mu_j mu_j^T) - E[x0] E[x0]^T, (D, D)."""
        dim = self.means.shape[1]
        second = (self.weights * self.stds**2).sum() * torch.eye(dim, dtype=torch.float64, device=self.device)
        second = second + (self.weights[:, None] * self.means).T @ self.means
        mean = self.mean()
        return second - torch.outer(mean, mean)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws from the data law, shape (n, *shape)."""
        modes = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x0 = self.means[modes] + self.stds[modes, None] * noise
        return x0.reshape(n, *self.shape)

    def eps(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The exact eps-prediction at x_t (B, *shape) and timesteps t (B,)."""
        flat = x.reshape(x.shape[0], -1).double()
        abar = self.alphas_cumprod[t.long()][:, None]  # (B, 1)
        var = abar * self.stds**2 + (1 - abar)  # (B, J): v_j
        centred = flat[:, None, :] - abar.sqrt()[..., None] * self.means  # (B, J, D)
        log_lik = -(centred**2).sum(-1) / (2 * var) - 0.5 * flat.shape[1] * var.log()
        resp = self._responsibilities(log_lik, labels)  # r_j(x)
        eps = (1 - abar).sqrt() * (resp[..., None] * centred / var[..., None]).sum(1)
        return eps.reshape(x.shape).to(x.dtype)

    def _responsibilities(self, log_lik: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """r_j(x) (B, J) from the modes' log-likelihoods; a label j < n_modes fixes the mode to j."""
        log_post = log_lik + self.weights.log()
        if labels is not None:
            conditioned = labels < self.n_modes
            one_mode = torch.full_like(log_post, -math.inf)
            one_mode[conditioned, labels[conditioned]] = 0.0
            log_post = torch.where(conditioned[:, None], one_mode, log_post)
        return log_post.softmax(dim=-1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The exact rectified-flow velocity E[x_1 - x_0 | x_t] at x_t (B, *shape), flow times t in [0, 1].

        Interpolation x_t = a x_0 + b x_1 with a = 1 - t, b = t, x_1 ~ N(0, I). Given mode j,
        (x_0, x_t) are jointly Gaussian: x_t ~ N(a mu_j, V_j I) with V_j = a^2 s_j^2 + b^2, and
            E[x_0 | x_t, j] = mu_j + a s_j^2 (x_t - a mu_j) / V_j,   E[x_1 | x_t, j] = b (x_t - a mu_j) / V_j,
        so  v_j(x_t) = (b - a s_j^2) (x_t - a mu_j) / V_j - mu_j  and  v = sum_j r_j(x_t) v_j(x_t),
        r_j the posterior responsibilities under p_t = sum_j w_j N(a mu_j, V_j I). Equivalently
        v = (eps* - x_t) / (1 - t), eps* = E[x_1 | x_t] = -t grad log p_t(x_t) (the tests check both).
        """
        flat = x.reshape(x.shape[0], -1).double()
        b = torch.as_tensor(t, dtype=torch.float64, device=flat.device).reshape(-1, 1).expand(flat.shape[0], 1)
        a = 1 - b  # (B, 1)
        var = a**2 * self.stds**2 + b**2  # (B, J): V_j
        centred = flat[:, None, :] - a[..., None] * self.means  # (B, J, D)
        log_lik = -(centred**2).sum(-1) / (2 * var) - 0.5 * flat.shape[1] * var.log()
        resp = self._responsibilities(log_lik, labels)
        per_mode = ((b - a * self.stds**2) / var)[..., None] * centred - self.means  # (B, J, D): v_j
        v = (resp[..., None] * per_mode).sum(1)
        return v.reshape(x.shape).to(x.dtype)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """CompVis's interface: eps for (x_t, t, class labels or None)."""
        return self.eps(x, t, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return self.eps(x, t, c)


class ToyAdapter(ModelAdapter):
    """The toy data law as a runner model: ``n_modes`` classes of small images, exact eps.

    Pixels of mode j are N(mu_j, s_j^2) with mu_j entries of size ~ ``pixel_scale``; images are
    (x + 1) / 2 clamped to [0, 1]. Real images for reference statistics are exact draws.
    """

    def __init__(
        self, shape: tuple[int, ...] = (3, 8, 8), n_modes: int = 10, seed: int = 0, pixel_scale: float = 0.5
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        self.sample_shape = shape
        self.num_classes = n_modes
        self.model = ToyGMMModel.random(shape, n_modes, seed, separation=pixel_scale * math.prod(shape) ** 0.5)
        self.scheduler_config = {
            "num_train_timesteps": self.model.num_timesteps,
            "beta_schedule": "linear",
            "beta_start": 1e-4,
            "beta_end": 0.02,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "prediction_type": "epsilon",
            "steps_offset": 1,
        }

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.model.eps(x, t, cond)

    def reference_images(self, n: int, seed: int = 0) -> torch.Tensor:
        x0 = self.model.sample_data(n, torch.Generator().manual_seed(seed)).float()
        return to_uint8(self.decode(x0))
