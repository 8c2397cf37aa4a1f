"""The moment-matched Gaussian-mixture reverse kernel of DDIM-GMM.

Gabbur, "Improved DDIM Sampling with Moment Matching Gaussian Mixtures", TMLR 2026
(arXiv 2311.04938). An independent implementation of ../shared/METHOD.md (docs/method.md).

A DDIM-GMM step draws ``x_s = m + sigma * (delta_{i,k} + L_i z)`` with ``k ~ Categorical(pi_i)``
and ``z ~ N(0, I_D)``. This module builds, for every sampling step i, the priors pi_i, the
offsets delta_{i,k} and the component covariance L_i L_i^T, and draws the unit-variance kernel
noise ``delta_{i,k} + L_i z``.

Notation (code -> METHOD.md):
    priors          pi_i            (K,)    mixture weights, sum to 1
    offsets         delta_{i,k}     (K, D)  component offsets in units of sigma (``diagonal``)
    component_std   diag(L_i)       (D,)    per-coordinate component std (``diagonal``)
    basis           U_i             (D, r)  orthonormal basis of the offsets (``full``)
    offset_coords   U_i^T delta_k   (K, r)  offsets in that basis (``full``)
    std_correction  sqrt(1-c) - 1   (r,)    L_i z = z + U_i (std_correction * U_i^T z) (``full``)
    offset_var      C = U S'^2 U^T          weighted covariance of the offsets, sum_k pi_k d_k d_k^T
Step index i counts sampling steps in the order they run: 0 is the first (noisiest) step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ddim_gmm_exp.noise import Generators, rand

MOMENTS = ("diagonal", "full")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Variances that exceed 1 by less than this are rounding, not clipping.
_CLIP_TOLERANCE = 1e-9
# Singular values below this fraction of the largest are the null direction sqrt(pi).
_RANK_TOLERANCE = 1e-10


@dataclass(frozen=True)
class GMMHyperparameters:
    """Everything that determines the kernel: the same values give the same kernel everywhere."""

    dim: int
    n_components: int
    n_steps: int
    scale: float = 1.0
    uniform_priors: bool = True
    orthonormal: bool = True
    upper_bound_vars: bool = True
    seed: int = 0
    moments: str = "diagonal"
    share_across_steps: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad value and what is allowed."""
        _require_int("dim", self.dim, minimum=1)
        _require_int("n_components", self.n_components, minimum=1)
        _require_int("n_steps", self.n_steps, minimum=1)
        _require_int("seed", self.seed, minimum=0)
        if not isinstance(self.scale, int | float) or not 0.0 <= float(self.scale) <= 1.0:
            raise ValueError(f"scale={self.scale!r} is not allowed: it must be a number in [0, 1]")
        if self.moments not in MOMENTS:
            raise ValueError(f"moments={self.moments!r} is not allowed: choose one of {MOMENTS}")
        for flag in ("uniform_priors", "orthonormal", "upper_bound_vars", "share_across_steps"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} is not allowed: it must be True or False")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= {minimum}")


def resolve_device(gpu: int | None = None, device: str | torch.device | None = None) -> torch.device:
    """The torch device for ``GMM(gpu=...)`` or ``GMM(device=...)``; CPU when neither is given."""
    if gpu is not None and device is not None:
        raise ValueError(f"gpu={gpu!r} and device={device!r} were both given: pass one of them")
    if gpu is not None:
        if isinstance(gpu, bool) or not isinstance(gpu, int) or gpu < 0:
            raise ValueError(f"gpu={gpu!r} is not allowed: it must be a GPU index >= 0")
        device = f"cuda:{gpu}"
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(resolved)!r} is not available here (no CUDA device): use GMM() for the CPU")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(resolved)!r} is not available here: use GMM() for the CPU")
    return resolved


def step_generator(seed: int, step_index: int) -> torch.Generator:
    """The CPU generator of step i: depends on (seed, i) alone, so steps can be built in any order."""
    state = np.random.SeedSequence([int(seed), int(step_index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_priors(n_components: int, uniform: bool, generator: torch.Generator) -> torch.Tensor:
    """pi: uniform 1/K, or one Dirichlet(1, ..., 1) draw as normalised Exp(1) draws -log(u)."""
    if uniform:
        return torch.full((n_components,), 1.0 / n_components, dtype=torch.float64)
    u = torch.rand(n_components, generator=generator, dtype=torch.float64)
    exp_draws = -torch.log(u.clamp_min(torch.finfo(torch.float64).tiny))
    return exp_draws / exp_draws.sum()


def centred_offsets(dim: int, priors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """G (D x K) with N(0, 1) entries, centred so that G pi = 0 (METHOD.md steps 2-3)."""
    raw = torch.randn(dim, priors.numel(), generator=generator, dtype=torch.float64)
    return raw - (raw @ priors)[:, None]


def shaped_offsets(
    centred: torch.Tensor, priors: torch.Tensor, orthonormal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted SVD of G diag(sqrt(pi)) and the shaped offsets (METHOD.md steps 4-5).

    Returns (U, S', coords): U is D x r orthonormal, S' the r singular values (all equal to 1
    when orthonormal), and coords (K x r) the offsets in the basis U, so that
    delta_k = U coords_k, sum_k pi_k delta_k = 0 and sum_k pi_k delta_k delta_k^T = U S'^2 U^T.
    """
    sqrt_pi = priors.sqrt()
    # Thin SVD of the tall D x K matrix through its QR: O(D K^2), a few times faster than gesdd.
    q, r = torch.linalg.qr(centred * sqrt_pi)
    u_small, s, vh = torch.linalg.svd(r)
    u = q @ u_small
    rank = int((s > _RANK_TOLERANCE * s.max().clamp_min(1e-300)).sum()) if s.numel() else 0
    rank = min(rank, priors.numel() - 1)  # W sqrt(pi) = 0 forces r <= K-1
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    shaped = torch.ones_like(s) if orthonormal else s
    coords = (shaped[:, None] * vh / sqrt_pi).T  # (K, r): diag(S') V^T diag(1/sqrt(pi)), transposed
    return u, shaped, coords


def offset_scale_factor(direction_var: torch.Tensor, coordinate_var: torch.Tensor, hp: GMMHyperparameters) -> float:
    """The one number a that the offsets are multiplied by (METHOD.md step 6).

    direction_var: the r eigenvalues S'^2 of C; coordinate_var: its diagonal v_d, both unscaled.
    full: largest (upper_bound_vars) or mean eigenvalue of C over its r directions is scale^2.
    diagonal: largest (upper_bound_vars) or mean per-coordinate variance v_d = C[d, d] is scale^2.
    """
    if direction_var.numel() == 0 or hp.scale == 0:
        return 0.0
    variances = direction_var if hp.moments == "full" else coordinate_var
    reference = variances.max() if hp.upper_bound_vars else variances.mean()
    return float(hp.scale / reference.sqrt())


@dataclass
class StepKernel:
    """The kernel parameters of one step, in float64 on the CPU."""

    priors: torch.Tensor  # (K,)
    basis: torch.Tensor  # (D, r)
    offset_coords: torch.Tensor  # (K, r), already scaled
    offset_eigvals: torch.Tensor  # (r,) eigenvalues c of C (full)
    offset_var: torch.Tensor  # (D,) per-coordinate variance v_d = C[d, d] (diagonal)
    clipped_fraction: float

    @property
    def offsets(self) -> torch.Tensor:
        """delta (K, D)."""
        return self.offset_coords @ self.basis.T


def build_step_kernel(hp: GMMHyperparameters, step_index: int) -> StepKernel:
    """Priors, offsets and component covariance of step i, as METHOD.md steps 1-7 say."""
    generator = step_generator(hp.seed, step_index)
    priors = draw_priors(hp.n_components, hp.uniform_priors, generator)
    centred = centred_offsets(hp.dim, priors, generator)
    basis, singular, coords = shaped_offsets(centred, priors, hp.orthonormal)
    direction_var = singular**2
    coordinate_var = (basis**2) @ direction_var  # C[d, d], the one O(D r) product of this step
    factor = offset_scale_factor(direction_var, coordinate_var, hp)
    coords = coords * factor
    eigvals = direction_var * factor**2
    offset_var = coordinate_var * factor**2
    if hp.moments == "full":
        clipped = eigvals > 1 + _CLIP_TOLERANCE
        clipped_fraction = float(clipped.double().mean()) if eigvals.numel() else 0.0
    else:
        clipped_fraction = float((offset_var > 1 + _CLIP_TOLERANCE).double().mean())
    return StepKernel(priors, basis, coords, eigvals, offset_var, clipped_fraction)


class GMM:
    """Per-step parameters of the moment-matched mixture kernel, on one device.

    ``GMM(gpu=0)`` or ``GMM(device="cuda")`` (CPU by default), then :meth:`initialize`. The
    parameters are built on a CPU generator in float64, so the kernel is the same on every
    device, then stored on the device in ``dtype``.
    """

    def __init__(
        self,
        gpu: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = resolve_device(gpu, device)
        self.dtype = _check_dtype(dtype)
        self.hparams: GMMHyperparameters | None = None
        self.clipped_fraction = 0.0
        self._tensors: dict[str, torch.Tensor] = {}

    def initialize(
        self,
        dim: int,
        n_components: int,
        n_steps: int,
        scale: float = 1.0,
        uniform_priors: bool = True,
        orthonormal: bool = True,
        upper_bound_vars: bool = True,
        seed: int = 0,
        moments: str = "diagonal",
        share_across_steps: bool = False,
        dtype: torch.dtype | None = None,
    ) -> GMM:
        """Build every step's priors, offsets and component covariance (METHOD.md)."""
        hp = GMMHyperparameters(
            dim=dim,
            n_components=n_components,
            n_steps=n_steps,
            scale=scale,
            uniform_priors=uniform_priors,
            orthonormal=orthonormal,
            upper_bound_vars=upper_bound_vars,
            seed=seed,
            moments=moments,
            share_across_steps=share_across_steps,
        )
        hp.validate()
        if dtype is not None:
            self.dtype = _check_dtype(dtype)
        self.hparams = hp
        n_stored = 1 if share_across_steps else n_steps
        self._tensors = self._allocate(hp, n_stored)
        clipped = []
        for i in range(n_stored):  # one step at a time: float64 work memory is one step's
            kernel = build_step_kernel(hp, i)
            self._store(i, kernel)
            clipped.append(kernel.clipped_fraction)
        self.step_clipped_fractions = clipped
        self.clipped_fraction = float(np.mean(clipped))
        return self

    def _allocate(self, hp: GMMHyperparameters, n_stored: int) -> dict[str, torch.Tensor]:
        """Zeroed storage for every step, in the form the noise draw uses, on the device."""
        k, d = hp.n_components, hp.dim
        # cumulative priors stay float64: the categorical draw compares them with float64 uniforms
        shapes = {"priors": ((n_stored, k), self.dtype), "cum_priors": ((n_stored, k), torch.float64)}
        if hp.moments == "diagonal":
            shapes |= {"offsets": ((n_stored, k, d), self.dtype), "component_std": ((n_stored, d), self.dtype)}
        else:
            rank = min(k - 1, d)  # padded with zero columns where a step's rank is lower
            shapes |= {
                "basis": ((n_stored, d, rank), self.dtype),
                "offset_coords": ((n_stored, k, rank), self.dtype),
                "std_correction": ((n_stored, rank), self.dtype),
            }
        return {name: torch.zeros(shape, dtype=dtype, device=self.device) for name, (shape, dtype) in shapes.items()}

    def _store(self, i: int, kernel: StepKernel) -> None:
        """Write step i's parameters into the storage."""
        store = self._tensors
        store["priors"][i] = kernel.priors
        store["cum_priors"][i] = kernel.priors.cumsum(-1)
        if self.hparams.moments == "diagonal":
            store["offsets"][i] = kernel.offsets
            store["component_std"][i] = (1 - kernel.offset_var).clamp_min(0).sqrt()
        else:
            r = kernel.basis.shape[1]
            store["basis"][i, :, :r] = kernel.basis
            store["offset_coords"][i, :, :r] = kernel.offset_coords
            store["std_correction"][i, :r] = (1 - kernel.offset_eigvals.clamp_max(1)).sqrt() - 1

    # ----------------------------------------------------------------------------- queries

    @property
    def initialized(self) -> bool:
        return self.hparams is not None

    def _require_initialized(self) -> GMMHyperparameters:
        if self.hparams is None:
            raise ValueError("this GMM has no parameters yet: call initialize(dim, n_components, n_steps) first")
        return self.hparams

    @property
    def is_trivial(self) -> bool:
        """K = 1 or scale = 0: delta = 0 and L = I, so the kernel is DDIM's Gaussian exactly."""
        hp = self._require_initialized()
        return hp.n_components == 1 or hp.scale == 0

    @property
    def memory_bytes(self) -> int:
        """Bytes the cached parameters take on the device."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def step_parameters(self, step_index: int) -> dict[str, torch.Tensor]:
        """The stored parameters of step i (priors, and offsets + component_std or basis +
        offset_coords + std_correction), as views on the device."""
        i = self._stored_index(step_index)
        return {name: t[i] for name, t in self._tensors.items()}

    def check_num_steps(self, num_steps: int) -> None:
        """Raise unless the kernel has a step for each of ``num_steps`` sampling steps."""
        hp = self._require_initialized()
        if not hp.share_across_steps and hp.n_steps != num_steps:
            raise ValueError(
                f"GMM n_steps={hp.n_steps} does not match the {num_steps} sampling steps: "
                f"initialize with n_steps={num_steps}, or with share_across_steps=True"
            )

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise unless one sample of ``shape`` (batch first) has the kernel's dimension D."""
        hp = self._require_initialized()
        dim = math.prod(shape[1:])
        if dim != hp.dim:
            raise ValueError(
                f"GMM dim={hp.dim} does not match the sample shape {tuple(shape[1:])} "
                f"(D = {dim}): initialize with dim={dim}"
            )

    def _stored_index(self, step_index: int) -> int:
        hp = self._require_initialized()
        if hp.share_across_steps:
            return 0
        if not 0 <= step_index < hp.n_steps:
            raise ValueError(f"step_index={step_index} is out of range: the kernel has steps 0..{hp.n_steps - 1}")
        return step_index

    def to(self, device: str | torch.device) -> GMM:
        """The same kernel on another device (a copy; self is unchanged)."""
        moved = GMM.__new__(GMM)
        moved.__dict__.update(self.__dict__)
        moved.device = torch.device(device)
        moved._tensors = {name: t.to(moved.device) for name, t in self._tensors.items()}
        return moved

    def state_dict(self) -> dict[str, Any]:
        """The hyperparameters, from which :meth:`initialize` rebuilds the same kernel."""
        return asdict(self._require_initialized())

    # ----------------------------------------------------------------------------- draws

    def draw_components(self, step_index: int, batch_size: int, generator: Generators = None) -> torch.Tensor:
        """k ~ Categorical(pi_i) for each sample: one uniform from its generator, inverted."""
        i = self._stored_index(step_index)
        uniforms = rand(batch_size, generator, device=self.device)
        cum = self._tensors["cum_priors"][i]
        return torch.searchsorted(cum, uniforms, right=True).clamp_max(cum.numel() - 1)

    def unit_noise(self, step_index: int, z: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
        """delta_{i,k} + L_i z for a batch: z (B, ...) standard normal, components (B,) indices.

        Its mean over k and z is 0 and its covariance I (full) or unit diagonal (diagonal).
        """
        hp = self._require_initialized()
        self.check_shape(tuple(z.shape))
        if self.is_trivial:
            return z
        params = self.step_parameters(step_index)
        flat = z.reshape(z.shape[0], hp.dim).to(self.device, self.dtype)
        components = components.to(self.device)
        if hp.moments == "diagonal":
            noise = params["offsets"][components] + params["component_std"] * flat
        else:
            basis = params["basis"]
            coords = params["offset_coords"][components] + params["std_correction"] * (flat @ basis)
            noise = flat + coords @ basis.T
        return noise.reshape(z.shape).to(z.device, z.dtype)

    def __repr__(self) -> str:
        if self.hparams is None:
            return f"GMM(device={str(self.device)!r}, uninitialized)"
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(self.hparams).items())
        return f"GMM({fields}, device={str(self.device)!r}, memory_bytes={self.memory_bytes})"


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed: choose one of {DTYPES}")
    return dtype
