"""The Gaussian-mixture reverse kernels of DDIM-GMM and RFIM-GMM.

Gabbur, "Improved DDIM Sampling with Moment Matching Gaussian Mixtures", TMLR 2026
(arXiv 2311.04938). An independent implementation of ../shared/METHOD.md (docs/method.md).

A mixture step draws k ~ Categorical(pi_i) and z ~ N(0, I_D) and adds to the DDIM (or RFIM)
mean m one of two perturbations, by ``construction``:

- ``"paper"`` (default; eqs. 7, 9-12, 34): ``x_s = m + delta_{i,k} + sqrt(max(sigma^2 - v_{i,k}, 0)) z``
  with ABSOLUTE offsets delta of norm about ``scale``; at eta = 0 the step is m + delta_k.
- ``"matched_diagonal"`` / ``"matched_full"`` (our extension): ``x_s = m + sigma (delta_{i,k} + L_i z)``
  with offsets in units of sigma and the per-coordinate variance (or whole covariance) exactly 1.

Notation (code -> METHOD.md):
    priors            pi_i            (K,)    mixture weights, sum to 1
    offsets           delta_{i,k}     (K, D)  component offsets (paper; matched_diagonal in units of sigma)
    variance_base     w_i             (D,)    v_{i,k} = variance_factor_k * w_i (paper)
    variance_factor   1 / (K pi_k)    (K,)    (paper; eq. 11 and eq. 34 both have this form)
    component_std     diag(L_i)       (D,)    per-coordinate component std (matched_diagonal)
    basis             U_i             (D, r)  orthonormal basis of the offsets (matched_full)
    offset_coords     U_i^T delta_k   (K, r)  offsets in that basis (matched_full)
    std_correction    sqrt(1-c) - 1   (r,)    L_i z = z + U_i (std_correction * U_i^T z) (matched_full)
Step index i counts sampling steps in the order they run: 0 is the first (noisiest) step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ddim_gmm_exp.noise import Draw, Generators, rand

CONSTRUCTIONS = ("paper", "matched_diagonal", "matched_full")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Variances that exceed 1 by less than this are rounding, not clipping (matched constructions).
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
    construction: str = "paper"
    share_across_steps: bool = False
    last_step: bool = False

    def validate(self, with_dim: bool = True) -> None:
        """Raise ValueError naming the first bad value and what is allowed (``with_dim=False``:
        skip the checks that need the sample size, for a config checked before its model loads)."""
        _require_int("dim", self.dim, minimum=1)
        _require_int("n_components", self.n_components, minimum=1)
        _require_int("n_steps", self.n_steps, minimum=1)
        _require_int("seed", self.seed, minimum=0)
        if self.construction not in CONSTRUCTIONS:
            raise ValueError(f"construction={self.construction!r} is not allowed: choose one of {CONSTRUCTIONS}")
        is_number = isinstance(self.scale, int | float) and not isinstance(self.scale, bool)
        if self.construction == "paper":
            if not is_number or not (0.0 <= float(self.scale) < math.inf):
                raise ValueError(f"scale={self.scale!r} is not allowed: it must be a finite number >= 0")
            if with_dim and self.n_components > self.dim:
                raise ValueError(
                    f"n_components={self.n_components} is not allowed for dim={self.dim}: "
                    "the paper's construction needs n_components <= dim"
                )
        elif not is_number or not 0.0 <= float(self.scale) <= 1.0:
            raise ValueError(
                f"scale={self.scale!r} is not allowed with construction={self.construction!r}: "
                "it must be a number in [0, 1] (any scale >= 0 needs construction='paper')"
            )
        for flag in ("uniform_priors", "orthonormal", "upper_bound_vars", "share_across_steps", "last_step"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} is not allowed: it must be True or False")


def variant_name(hp: GMMHyperparameters) -> str:
    """The paper's name for a kernel: RAND, ORTHO, ORTHO-VUB, ORTHO-VUB* (RAND-VUB, RAND-VUB* are
    ours: VUB with RAND offsets is outside the paper); matched constructions by their own name."""
    if hp.construction != "paper":
        return hp.construction
    name = ("ORTHO" if hp.orthonormal else "RAND") + ("-VUB" if hp.upper_bound_vars else "")
    return name + ("*" if hp.share_across_steps else "")


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


def raw_offsets(dim: int, n_components: int, generator: torch.Generator) -> torch.Tensor:
    """O (D x K) with N(0, 1) entries (METHOD.md step 2)."""
    return torch.randn(dim, n_components, generator=generator, dtype=torch.float64)


def rand_offsets(raw: torch.Tensor, priors: torch.Tensor, scale: float) -> torch.Tensor:
    """RAND (eq. 9): C = O - (O pi) 1^T, delta_k = s C_k / ||C_k||; (K, D), every norm exactly s."""
    centred = raw - (raw @ priors)[:, None]
    norms = centred.norm(dim=0)
    # K = 1 centres its one column to 0: no direction, no offset (the kernel is DDIM's)
    unit = torch.where(norms > 0, centred / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return scale * unit.T


def ortho_offsets(raw: torch.Tensor, priors: torch.Tensor, scale: float) -> torch.Tensor:
    """ORTHO (eq. 10): U = the K left singular vectors of O, delta_k = s (U_k - U pi); (K, D).

    The pi-weighted mean is exactly 0 and ||delta_k||^2 = s^2 (1 - 2 pi_k + sum_l pi_l^2).
    """
    q, r = torch.linalg.qr(raw)  # thin SVD of the tall O through its QR: O(D K^2)
    u_small, _, _ = torch.linalg.svd(r)
    basis = q @ u_small
    return scale * (basis - (basis @ priors)[:, None]).T


def diagonal_variance_offsets(offsets: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11: v_k = (1 / (K pi_k)) sum_l pi_l delta_l^2, as (w, factor) with v_k = factor_k w."""
    weighted_square = priors @ offsets**2  # w = sum_l pi_l delta_l^2, (D,)
    return weighted_square, 1.0 / (priors.numel() * priors)


def upper_bound_variance_offsets(dim: int, priors: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VUB (eqs. 12, 34): v_k is 0 except on the first K coordinates, which get the eigenvalue
    upper bounds (s^2 / (K pi_k)) pi_(j), pi_(j) the priors in ascending order; as (w, factor)."""
    base = torch.zeros(dim, dtype=torch.float64)
    base[: priors.numel()] = scale**2 * torch.sort(priors).values
    return base, 1.0 / (priors.numel() * priors)


@dataclass
class PaperStepKernel:
    """One step of the paper's kernel, in float64 on the CPU."""

    priors: torch.Tensor  # (K,)
    offsets: torch.Tensor  # (K, D) absolute offsets delta_k
    variance_base: torch.Tensor  # (D,) w
    variance_factor: torch.Tensor  # (K,) v_k = factor_k * w

    @property
    def variance_offsets(self) -> torch.Tensor:
        """v (K, D), the diagonal of Delta_k."""
        return self.variance_factor[:, None] * self.variance_base[None, :]


def build_paper_step(hp: GMMHyperparameters, step_index: int) -> PaperStepKernel:
    """Priors, offsets and variance offsets of step i, as METHOD.md's paper construction says."""
    generator = step_generator(hp.seed, step_index)
    priors = draw_priors(hp.n_components, hp.uniform_priors, generator)
    raw = raw_offsets(hp.dim, hp.n_components, generator)
    scale = float(hp.scale)
    offsets = ortho_offsets(raw, priors, scale) if hp.orthonormal else rand_offsets(raw, priors, scale)
    if hp.upper_bound_vars:
        base, factor = upper_bound_variance_offsets(hp.dim, priors, scale)
    else:
        base, factor = diagonal_variance_offsets(offsets, priors)
    return PaperStepKernel(priors, offsets, base, factor)


# ------------------------------------------------------------ matched constructions (our extension)


def centred_offsets(dim: int, priors: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """G (D x K) with N(0, 1) entries, centred so that G pi = 0 (METHOD.md steps 2-3)."""
    raw = raw_offsets(dim, priors.numel(), generator)
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
    variances = direction_var if hp.construction == "matched_full" else coordinate_var
    reference = variances.max() if hp.upper_bound_vars else variances.mean()
    return float(hp.scale / reference.sqrt())


@dataclass
class MatchedStepKernel:
    """One step of a matched construction, in float64 on the CPU."""

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


def build_matched_step(hp: GMMHyperparameters, step_index: int) -> MatchedStepKernel:
    """Priors, offsets (units of sigma) and component covariance of step i, exactly matched:
    centred Gaussian offsets, weighted SVD, one scale factor (docs/method.md)."""
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
    if hp.construction == "matched_full":
        clipped = eigvals > 1 + _CLIP_TOLERANCE
        clipped_fraction = float(clipped.double().mean()) if eigvals.numel() else 0.0
    else:
        clipped_fraction = float((offset_var > 1 + _CLIP_TOLERANCE).double().mean())
    return MatchedStepKernel(priors, basis, coords, eigvals, offset_var, clipped_fraction)


class GMM:
    """Per-step parameters of the Gaussian-mixture kernel, on one device.

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
        self._tensors: dict[str, torch.Tensor] = {}
        self._matched_clipped: list[float] = []

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
        construction: str = "paper",
        share_across_steps: bool = False,
        last_step: bool = False,
        dtype: torch.dtype | None = None,
    ) -> GMM:
        """Build every step's priors, offsets and component variances (METHOD.md)."""
        hp = GMMHyperparameters(
            dim=dim,
            n_components=n_components,
            n_steps=n_steps,
            scale=scale,
            uniform_priors=uniform_priors,
            orthonormal=orthonormal,
            upper_bound_vars=upper_bound_vars,
            seed=seed,
            construction=construction,
            share_across_steps=share_across_steps,
            last_step=last_step,
        )
        hp.validate()
        if dtype is not None:
            self.dtype = _check_dtype(dtype)
        self.hparams = hp
        n_stored = 1 if share_across_steps else n_steps
        self._tensors = self._allocate(hp, n_stored)
        self._matched_clipped = []
        for i in range(n_stored):  # one step at a time: float64 work memory is one step's
            if hp.construction == "paper":
                self._store_paper(i, build_paper_step(hp, i))
            else:
                kernel = build_matched_step(hp, i)
                self._store_matched(i, kernel)
                self._matched_clipped.append(kernel.clipped_fraction)
        return self

    def _allocate(self, hp: GMMHyperparameters, n_stored: int) -> dict[str, torch.Tensor]:
        """Zeroed storage for every step, in the form the noise draw uses, on the device."""
        k, d = hp.n_components, hp.dim
        # cumulative priors stay float64: the categorical draw compares them with float64 uniforms
        shapes = {"priors": ((n_stored, k), self.dtype), "cum_priors": ((n_stored, k), torch.float64)}
        if hp.construction == "paper":
            shapes |= {
                "offsets": ((n_stored, k, d), self.dtype),
                "variance_base": ((n_stored, d), self.dtype),
                "variance_factor": ((n_stored, k), self.dtype),
            }
        elif hp.construction == "matched_diagonal":
            shapes |= {"offsets": ((n_stored, k, d), self.dtype), "component_std": ((n_stored, d), self.dtype)}
        else:
            rank = min(k - 1, d)  # padded with zero columns where a step's rank is lower
            shapes |= {
                "basis": ((n_stored, d, rank), self.dtype),
                "offset_coords": ((n_stored, k, rank), self.dtype),
                "std_correction": ((n_stored, rank), self.dtype),
            }
        return {name: torch.zeros(shape, dtype=dtype, device=self.device) for name, (shape, dtype) in shapes.items()}

    def _store_priors(self, i: int, priors: torch.Tensor) -> None:
        self._tensors["priors"][i] = priors
        self._tensors["cum_priors"][i] = priors.cumsum(-1)

    def _store_paper(self, i: int, kernel: PaperStepKernel) -> None:
        self._store_priors(i, kernel.priors)
        self._tensors["offsets"][i] = kernel.offsets
        self._tensors["variance_base"][i] = kernel.variance_base
        self._tensors["variance_factor"][i] = kernel.variance_factor

    def _store_matched(self, i: int, kernel: MatchedStepKernel) -> None:
        store = self._tensors
        self._store_priors(i, kernel.priors)
        if self.hparams.construction == "matched_diagonal":
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
        """K = 1 or scale = 0: delta = 0 and v = 0, so the kernel is DDIM's Gaussian exactly."""
        hp = self._require_initialized()
        return hp.n_components == 1 or hp.scale == 0

    @property
    def acts_without_noise(self) -> bool:
        """Whether the mixture changes an eta = 0 step: yes for the paper's kernel (m + delta_k),
        no for the matched constructions (their offsets are in units of sigma = 0)."""
        return self._require_initialized().construction == "paper"

    def mixes_at(self, step_index: int, num_steps: int, eta: float) -> bool:
        """Whether step i of num_steps draws from the mixture (else it is DDIM's Gaussian step).

        Not for a trivial kernel; not on the last step (the one that returns the sample) unless
        ``last_step``; not at eta = 0 for a matched construction.
        """
        hp = self._require_initialized()
        if self.is_trivial or (step_index == num_steps - 1 and not hp.last_step):
            return False
        return eta > 0 or self.acts_without_noise

    @property
    def memory_bytes(self) -> int:
        """Bytes the cached parameters take on the device."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def step_parameters(self, step_index: int) -> dict[str, torch.Tensor]:
        """The stored parameters of step i, as views on the device: priors, cum_priors, and
        offsets + variance_base + variance_factor (paper), offsets + component_std
        (matched_diagonal) or basis + offset_coords + std_correction (matched_full)."""
        i = self._stored_index(step_index)
        return {name: t[i] for name, t in self._tensors.items()}

    def offsets(self, step_index: int) -> torch.Tensor:
        """delta_{i,k} (K, D): absolute (paper) or in units of sigma (matched)."""
        params = self.step_parameters(step_index)
        if "offsets" in params:
            return params["offsets"]
        return params["offset_coords"] @ params["basis"].T

    def step_clipped_fraction(self, step_index: int, sigma: float) -> float:
        """Of step i's coordinates, the pi-weighted fraction whose component variance is clipped.

        Paper: entries with sigma^2 < v_k[d], weighted by pi_k (with uniform priors, the plain
        fraction of (component, coordinate) entries; every v_k is the same then). Matched: the
        fraction of directions whose offset variance exceeds 1 (independent of sigma).
        """
        hp = self._require_initialized()
        if self.is_trivial:
            return 0.0
        if hp.construction != "paper":
            return self._matched_clipped[self._stored_index(step_index)]
        params = self.step_parameters(step_index)
        factor, base = params["variance_factor"].double(), params["variance_base"].double()
        clipped = (factor[:, None] * base[None, :] > float(sigma) ** 2).double().mean(dim=1)  # (K,)
        return float(params["priors"].double() @ clipped)

    def offset_mean_norm(self) -> float:
        """|sum_k pi_k delta_k| averaged over the stored steps: RAND's (eq. 9) weighted offset mean is
        only approximately 0, ORTHO's (eq. 10) is 0 up to rounding (METHOD.md asks for it reported)."""
        hp = self._require_initialized()
        stored = 1 if hp.share_across_steps else hp.n_steps
        norms = [
            float((self.step_parameters(i)["priors"].double() @ self.offsets(i).double()).norm()) for i in range(stored)
        ]
        return float(np.mean(norms))

    def clipped_fraction(self, sigmas: Sequence[float], eta: float, steps: Sequence[int] | None = None) -> float:
        """The clipped fraction over the (step, coordinate) entries of the steps that mix
        (paper A.5); sigmas[i] is step i's sigma, for every step of the run; ``steps``: only these
        step indices (a partial run, e.g. img2img's last steps). 0 when none mixes."""
        candidates = range(len(sigmas)) if steps is None else steps
        steps = [i for i in candidates if self.mixes_at(i, len(sigmas), eta)]
        if not steps:
            return 0.0
        return float(np.mean([self.step_clipped_fraction(i, sigmas[i]) for i in steps]))

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

    def mixture_draw(self, shape: tuple[int, ...]) -> Draw:
        """What a mixture step draws from each sample's stream after its z: one float64 uniform,
        inverted into the component k (:meth:`components_from_draw`)."""
        return Draw("rand", (), torch.float64)

    def components_from_draw(
        self, step_index: int, uniforms: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """k ~ Categorical(pi_i) for each sample, from its uniform: the first k with u < sum_{l<=k} pi_l."""
        cum = self._tensors["cum_priors"][self._stored_index(step_index)]
        return torch.searchsorted(cum, uniforms.to(self.device), right=True).clamp_max(cum.numel() - 1)

    def draw_components(
        self, step_index: int, batch_size: int, generator: Generators = None, *, like: torch.Tensor | None = None
    ) -> torch.Tensor:
        """k ~ Categorical(pi_i) for each sample: one uniform from its generator, inverted
        (``like``, the step's z, is what other kernels draw their shape from; unused here).

        The uniforms are drawn where the generator lives (the CPU for CPU generators), so a CUDA
        generator works with a CPU kernel and the other way round.
        """
        self._stored_index(step_index)
        return self.components_from_draw(step_index, rand(batch_size, generator, device=self.device))

    def perturbation(
        self,
        step_index: int,
        sigma: float | torch.Tensor,
        z: torch.Tensor | None,
        components: torch.Tensor,
        *,
        like: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_s - m of a mixture step, for a batch: z (B, ...) standard normal, components (B,).

        paper:   delta_{i,k} + sqrt(max(sigma^2 - v_{i,k}, 0)) z   (eq. 7 with eq. 11 or 34)
        matched: sigma (delta_{i,k} + L_i z)
        z = None (eta = 0, where sigma = 0): the paper's delta_{i,k} alone, shaped like ``like``.
        sigma is a number or a 0-d tensor (on any device), used as it is: nothing is read back
        to the host. Computed in the kernel's dtype on its device; returned in z's (or like's)
        dtype on its device.
        """
        hp = self._require_initialized()
        target = z if z is not None else like
        if target is None:
            raise ValueError("perturbation needs z, or like (the mean) where no z was drawn (eta = 0)")
        self.check_shape(tuple(target.shape))
        params = self.step_parameters(step_index)
        components = components.to(self.device)
        if z is None:
            if hp.construction != "paper":
                raise ValueError(f"construction={hp.construction!r} needs z: its offsets are in units of sigma")
            return params["offsets"][components].reshape(target.shape).to(target.device, target.dtype)
        flat = z.reshape(z.shape[0], hp.dim).to(self.device, self.dtype)
        if hp.construction == "paper":
            variance = params["variance_factor"][components, None] * params["variance_base"]
            out = params["offsets"][components] + (sigma**2 - variance).clamp_min(0).sqrt() * flat
        elif hp.construction == "matched_diagonal":
            out = sigma * (params["offsets"][components] + params["component_std"] * flat)
        else:
            out = sigma * self._matched_full_unit_noise(params, flat, components)
        return out.reshape(z.shape).to(z.device, z.dtype)

    @staticmethod
    def _matched_full_unit_noise(
        params: dict[str, torch.Tensor], flat: torch.Tensor, components: torch.Tensor
    ) -> torch.Tensor:
        """delta_k + L z = z + U (coords_k + std_correction * U^T z), one sample at a time: a
        batched matmul's BLAS blocking depends on the batch size, so a sample's rounding would too."""
        basis = params["basis"]
        # one gather for the batch (a copy of rows, no arithmetic), not [k] per sample: indexing by
        # a 0-d tensor reads it back to the host
        offset_coords = params["offset_coords"][components]
        rows = []
        for z, coord_k in zip(flat, offset_coords, strict=True):
            coords = coord_k + params["std_correction"] * (z @ basis)
            rows.append(z + basis @ coords)
        return torch.stack(rows)

    def __repr__(self) -> str:
        if self.hparams is None:
            return f"GMM(device={str(self.device)!r}, uninitialized)"
        fields = ", ".join(f"{k}={v!r}" for k, v in asdict(self.hparams).items())
        return f"GMM({fields}, device={str(self.device)!r}, memory_bytes={self.memory_bytes})"


def _check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed: choose one of {DTYPES}")
    return dtype
