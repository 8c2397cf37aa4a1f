"""The kernel's identities (METHOD.md), its statistics, clipping, and its bad arguments."""

import itertools
from unittest.mock import MagicMock

import pytest
import torch

from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.noise import sample_generators

MATCHED = ["matched_diagonal", "matched_full"]
FLAGS = list(itertools.product([True, False], repeat=3))  # orthonormal, upper_bound_vars, uniform


def build(dim, k, construction, orthonormal=True, upper=True, uniform=True, scale=1.0, n_steps=1, **kw):
    return GMM(dtype=torch.float64).initialize(
        dim=dim,
        n_components=k,
        n_steps=n_steps,
        scale=scale,
        uniform_priors=uniform,
        orthonormal=orthonormal,
        upper_bound_vars=upper,
        construction=construction,
        **kw,
    )


def offsets_of(gmm, i=0):
    """delta (K, D), whichever way the construction stores it."""
    return gmm.offsets(i)


def unit_noise(gmm, i, z, k):
    """A matched construction's delta_k + L z: its perturbation at sigma = 1."""
    return gmm.perturbation(i, 1.0, z, k)


def component_cov(gmm, i=0):
    """L L^T as a dense D x D matrix, measured through the kernel's own noise draw:
    unit_noise(z = e_d, k = 0) - delta_0 is L e_d, column by column."""
    dim = gmm.hparams.dim
    identity = torch.eye(dim, dtype=torch.float64)
    first = torch.zeros(dim, dtype=torch.long)
    lz = (unit_noise(gmm, i, identity, first) - offsets_of(gmm, i)[0]).T  # columns L e_d
    return lz @ lz.T


def offset_cov(gmm, i=0):
    """C = sum_k pi_k delta_k delta_k^T."""
    delta, pi = offsets_of(gmm, i), gmm.step_parameters(i)["priors"]
    return delta.T @ (pi[:, None] * delta)


@pytest.mark.parametrize("construction", MATCHED)
@pytest.mark.parametrize("dim", [16, 64, 512])
@pytest.mark.parametrize("k", [2, 4, 16])
@pytest.mark.parametrize("orthonormal,upper,uniform", FLAGS)
def test_moment_identities(construction, dim, k, orthonormal, upper, uniform):
    gmm = build(dim, k, construction, orthonormal, upper, uniform, n_steps=2)
    for i in range(2):
        pi = gmm.step_parameters(i)["priors"]
        delta = offsets_of(gmm, i)
        assert torch.allclose(pi.sum(), torch.tensor(1.0, dtype=torch.float64))
        # first moment: sum_k pi_k delta_k = 0
        assert (pi @ delta).abs().max() < 1e-10
        c, llt = offset_cov(gmm, i), component_cov(gmm, i)
        assert torch.linalg.matrix_rank(c) <= k - 1  # r <= K - 1
        if gmm.step_clipped_fraction(i, 1.0) > 0:
            continue
        if construction == "matched_full":
            assert (c + llt - torch.eye(dim, dtype=torch.float64)).abs().max() < 1e-6
        else:
            assert (torch.diagonal(c) + torch.diagonal(llt) - 1).abs().max() < 1e-6
            # L is diagonal in this mode
            assert torch.count_nonzero(llt - torch.diag(torch.diagonal(llt))) == 0


@pytest.mark.parametrize("construction", MATCHED)
@pytest.mark.parametrize("upper", [True, False])
@pytest.mark.parametrize("orthonormal", [True, False])
def test_scale_sets_largest_or_mean_variance(construction, upper, orthonormal):
    scale = 0.6
    gmm = build(64, 8, construction, orthonormal, upper, uniform=False, scale=scale)
    c = offset_cov(gmm)
    if construction == "matched_full":
        variances = torch.linalg.eigvalsh(c)[-7:]  # the r = K - 1 non-zero eigenvalues
    else:
        variances = torch.diagonal(c)
    reference = variances.max() if upper else variances.mean()
    assert reference.item() == pytest.approx(scale**2, rel=1e-9)


def test_full_orthonormal_uniform_is_regular_simplex():
    gmm = build(32, 5, "matched_full")
    delta = offsets_of(gmm)
    norms = delta.norm(dim=1)
    assert torch.allclose(norms, norms[0].expand(5), rtol=1e-10)
    gram = delta @ delta.T
    off_diagonal = gram[~torch.eye(5, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, -(norms[0] ** 2) / 4 * torch.ones_like(off_diagonal), rtol=1e-9)


def expected_clipping(construction, orthonormal, upper, k):
    """METHOD.md: only without upper_bound_vars, and never for orthonormal offsets in full mode
    (equal eigenvalues) nor with a single offset direction (K = 2)."""
    if upper or k == 2 and construction == "matched_full":
        return False
    return construction == "matched_diagonal" or not orthonormal


@pytest.mark.parametrize("construction", MATCHED)
@pytest.mark.parametrize("orthonormal,upper,uniform", FLAGS)
@pytest.mark.parametrize("k", [2, 8])
def test_clipping_reported_exactly_where_method_says(construction, orthonormal, upper, uniform, k):
    gmm = build(64, k, construction, orthonormal, upper, uniform)
    c = offset_cov(gmm)
    # an independent count of the directions whose offset variance exceeds 1
    if construction == "matched_full":
        eig = torch.linalg.eigvalsh(c)[-(k - 1) :]
        fraction = (eig > 1 + 1e-9).double().mean().item()
    else:
        fraction = (torch.diagonal(c) > 1 + 1e-9).double().mean().item()
    reported = gmm.clipped_fraction([1.0, 0.0], eta=1.0)  # one mixing step (the last does not mix)
    assert reported == pytest.approx(fraction)
    assert (reported > 0) == expected_clipping(construction, orthonormal, upper, k)
    if reported > 0:
        # where clipped, the component variance is 0 and the second moment exceeds 1 there
        llt = component_cov(gmm)
        total = torch.diagonal(c + llt) if construction == "matched_diagonal" else torch.linalg.eigvalsh(c + llt)
        assert total.max() > 1 + 1e-6
        assert total.min() > 1 - 1e-6


@pytest.mark.parametrize("construction", MATCHED)
def test_kernel_draws_have_the_matched_moments(construction):
    """10^5 draws of delta_k + L z: mean 0 and covariance C + L L^T (I for full)."""
    dim, n = 6, 100_000
    gmm = build(dim, 4, construction, orthonormal=False, uniform=False)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    k = gmm.draw_components(0, n, g)
    draws = unit_noise(gmm, 0, z, k)
    pi = gmm.step_parameters(0)["priors"]
    counts = torch.bincount(k, minlength=4).double() / n
    assert (counts - pi).abs().max() < 5 * (0.25 / n) ** 0.5
    assert draws.mean(0).abs().max() < 5 / n**0.5
    expected = offset_cov(gmm) + component_cov(gmm)
    if construction == "matched_full":
        assert torch.allclose(expected, torch.eye(dim, dtype=torch.float64), atol=1e-9)
    else:
        assert torch.allclose(torch.diagonal(expected), torch.ones(dim, dtype=torch.float64))
    empirical = torch.cov(draws.T)
    assert (empirical - expected).abs().max() < 6 * (2 / n) ** 0.5


def test_kernel_depends_only_on_seed_and_step():
    a = GMM().initialize(dim=48, n_components=4, n_steps=5, seed=3)
    b = GMM().initialize(dim=48, n_components=4, n_steps=10, seed=3)
    c = GMM().initialize(dim=48, n_components=4, n_steps=5, seed=4)
    for i in range(5):
        assert torch.equal(offsets_of(a, i), offsets_of(b, i))
    assert not torch.equal(offsets_of(a, 0), offsets_of(c, 0))
    assert not torch.equal(offsets_of(a, 0), offsets_of(a, 1))


def test_shared_parameters_use_one_step_of_memory():
    per_step = GMM().initialize(dim=300, n_components=8, n_steps=20)
    shared = GMM().initialize(dim=300, n_components=8, n_steps=20, share_across_steps=True)
    # float32: priors K, cumulative priors K (float64), offsets K*D, variance base D and factor K
    one_step = 4 * 8 + 8 * 8 + 4 * 8 * 300 + 4 * 300 + 4 * 8
    assert shared.memory_bytes == one_step
    assert per_step.memory_bytes == 20 * one_step
    assert torch.equal(offsets_of(shared, 0), offsets_of(shared, 19))
    shared.check_num_steps(7)  # any number of sampling steps
    with pytest.raises(ValueError, match="n_steps=20 does not match the 7 sampling steps"):
        per_step.check_num_steps(7)


@pytest.mark.parametrize("construction", ["paper", *MATCHED])
@pytest.mark.parametrize("orthonormal", [True, False])
def test_trivial_kernels(construction, orthonormal):
    for gmm in (
        GMM().initialize(dim=12, n_components=1, n_steps=2, construction=construction, orthonormal=orthonormal),
        GMM().initialize(dim=12, n_components=6, n_steps=2, scale=0.0, construction=construction),
    ):
        assert gmm.is_trivial
        assert not any(gmm.mixes_at(i, 2, eta) for i in range(2) for eta in (0.0, 1.0))
        assert torch.count_nonzero(offsets_of(gmm)) == 0
        assert torch.isfinite(offsets_of(gmm)).all()


def test_per_sample_components_do_not_depend_on_the_batch():
    gmm = GMM().initialize(dim=32, n_components=16, n_steps=1, uniform_priors=False)
    alone = torch.cat([gmm.draw_components(0, 1, sample_generators([s])) for s in range(7)])
    together = gmm.draw_components(0, 7, sample_generators(range(7)))
    assert torch.equal(alone, together)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"n_components": 0}, "n_components=0 is not allowed: it must be an integer >= 1"),
        ({"n_components": 2.5}, "n_components=2.5"),
        ({"scale": -0.1}, r"scale=-0.1 is not allowed: it must be a finite number >= 0"),
        ({"scale": float("inf")}, r"scale=inf is not allowed: it must be a finite number >= 0"),
        (
            {"scale": 1.5, "construction": "matched_diagonal"},
            r"scale=1.5 is not allowed with construction='matched_diagonal': it must be a number in \[0, 1\]",
        ),
        (
            {"scale": 1.01, "construction": "matched_full"},
            r"scale=1.01 is not allowed with construction='matched_full'",
        ),
        ({"n_components": 17}, "n_components=17 is not allowed for dim=16: the paper's construction needs"),
        ({"last_step": 1}, "last_step=1 is not allowed: it must be True or False"),
        ({"n_steps": 0}, "n_steps=0 is not allowed: it must be an integer >= 1"),
        ({"dim": 0}, "dim=0 is not allowed"),
        (
            {"construction": "spherical"},
            r"construction='spherical' is not allowed: choose one of \('paper', 'matched_diagonal', 'matched_full'\)",
        ),
        ({"moments": "full"}, "unexpected keyword argument 'moments'"),
        ({"seed": -1}, "seed=-1 is not allowed"),
        ({"orthonormal": "yes"}, "orthonormal='yes' is not allowed"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    args = {"dim": 16, "n_components": 4, "n_steps": 3} | kwargs
    with pytest.raises(TypeError if "moments" in kwargs else ValueError, match=message):
        GMM().initialize(**args)


def test_bad_devices_raise_value_error():
    with pytest.raises(ValueError, match="device='tpu:0' is not a torch device"):
        GMM(device="tpu:0")
    with pytest.raises(ValueError, match="gpu=-1 is not allowed"):
        GMM(gpu=-1)
    with pytest.raises(ValueError, match="were both given"):
        GMM(gpu=0, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:0' is not available here"):
            GMM(gpu=0)


def test_dim_must_match_the_sample_shape():
    gmm = GMM().initialize(dim=48, n_components=4, n_steps=1)
    with pytest.raises(ValueError, match=r"GMM dim=48 does not match the sample shape \(3, 4, 5\)"):
        gmm.check_shape((2, 3, 4, 5))
    with pytest.raises(ValueError, match="call initialize"):
        GMM().check_shape((2, 3))


@pytest.mark.parametrize("construction", ["paper", *MATCHED])
def test_perturbation_of_a_sample_does_not_depend_on_its_batch(construction):
    """Bit for bit in float32: the matched_full projection runs per sample (a batched matmul's
    rounding depends on the batch size)."""
    gmm = GMM().initialize(dim=3 * 32 * 32, n_components=16, n_steps=2, construction=construction, scale=0.7)
    z = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    k = torch.arange(7) % 16
    together = gmm.perturbation(0, 0.8, z, k)
    for b in range(7):
        assert torch.equal(gmm.perturbation(0, 0.8, z[b : b + 1], k[b : b + 1])[0], together[b])


def test_component_draws_follow_the_generators_device(monkeypatch):
    """A CPU GMM() with a CUDA generator draws its uniforms on the generator's device (a generator
    cannot draw anywhere else), then moves them. Mimicked on CPU: a generator that reports cuda:0."""
    import ddim_gmm_exp.noise as noise

    cuda_generator = MagicMock(spec=torch.Generator)
    cuda_generator.device = torch.device("cuda", 0)
    calls = []
    real_empty = torch.empty

    def fake_empty(shape, dtype=None, device=None, pin_memory=False):
        calls.append(("empty", torch.device(device)))
        return real_empty(shape, dtype=dtype)

    def fake_fill(out, draw, generator):
        calls.append(("fill", generator))
        out.fill_(0.5)

    monkeypatch.setattr(noise.torch, "empty", fake_empty)
    monkeypatch.setattr(noise, "_fill", fake_fill)
    gmm = GMM().initialize(dim=16, n_components=4, n_steps=1)
    components = gmm.draw_components(0, 3, cuda_generator)
    assert calls == [("empty", torch.device("cuda", 0)), ("fill", cuda_generator)]
    assert components.device == gmm.device and components.tolist() == [2, 2, 2]


@pytest.mark.gpu
def test_cpu_gmm_with_a_real_cuda_generator():
    """The real mismatch on a GPU machine: a CPU GMM() and per-sample CUDA generators."""
    gmm = GMM().initialize(dim=16, n_components=4, n_steps=1)
    generators = sample_generators(range(3), device="cuda")
    components = gmm.draw_components(0, 3, generators)
    again = gmm.draw_components(0, 3, sample_generators(range(3), device="cuda"))
    assert components.device.type == "cpu" and torch.equal(components, again)
    on_gpu = gmm.to("cuda").draw_components(0, 3, sample_generators(range(3), device="cuda"))
    assert torch.equal(on_gpu.cpu(), components)
