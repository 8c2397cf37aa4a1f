"""The control sampler (DDIM + a fresh isotropic offset of norm s) and the variance account."""

import pytest
import torch

from ddim_gmm_exp.controls import IsotropicOffsetKernel, VarianceAccount
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.models.toy import ToyGMMModel
from ddim_gmm_exp.noise import randn, sample_generators
from ddim_gmm_exp.samplers import DiffusionSchedule, ddim, ddim_gmm, ddim_noise

SHAPE = (3, 4, 4)
D = 48


class StepRecorder(VarianceAccount):
    """The account, plus every sample's own squared distance (for standard errors)."""

    def __init__(self) -> None:
        super().__init__(D)
        self.per_sample: dict[int, torch.Tensor] = {}

    def on_mean(self, step_index, x_s, mean, sigma):
        super().on_mean(step_index, x_s, mean, sigma)
        self.per_sample[step_index] = (x_s.double() - mean.double()).flatten(1).pow(2).sum(1)


@pytest.fixture(scope="module")
def toy():
    return ToyGMMModel.random(shape=SHAPE, n_modes=3, seed=0)


def schedule_of(toy, steps=5):
    timesteps = list(range(999, -1, -1000 // steps))
    return DiffusionSchedule(timesteps, toy.alphas_cumprod.float(), torch.tensor(1.0))


def run(toy, sampler, n=8, callback=None, steps=5, **options):
    generators = sample_generators(range(n))
    x = randn((n, *SHAPE), generators)
    denoiser = lambda x, t: toy.apply_model(x, t, None)  # noqa: E731
    return sampler(denoiser, x, schedule_of(toy, steps), generator=generators, callback=callback, **options)


@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_control_offset_has_norm_exactly_s_at_eta_zero(toy, scale):
    recorder = StepRecorder()
    run(toy, ddim_noise, callback=recorder, eta=0.0, scale=scale)
    for i in range(4):  # every non-last step
        assert torch.allclose(recorder.per_sample[i].sqrt(), torch.full((8,), scale, dtype=torch.float64), rtol=1e-5)
    assert torch.equal(recorder.per_sample[4], torch.zeros(8, dtype=torch.float64))  # the last step is DDIM's


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_control_with_s_zero_is_ddim_bit_for_bit(toy, eta):
    assert torch.equal(run(toy, ddim_noise, eta=eta, scale=0.0), run(toy, ddim, eta=eta))
    assert not torch.equal(run(toy, ddim_noise, eta=eta, scale=0.5), run(toy, ddim, eta=eta))


def test_control_last_step_follows_the_gmm_rule(toy):
    one_step = run(toy, ddim, steps=1)
    assert torch.equal(run(toy, ddim_noise, steps=1, scale=1.0), one_step)
    assert not torch.equal(run(toy, ddim_noise, steps=1, scale=1.0, last_step=True), one_step)


def test_bad_control_scale():
    with pytest.raises(ValueError, match="scale=-1 is not allowed: it must be a finite number >= 0"):
        IsotropicOffsetKernel(-1)


def within_standard_errors(recorder, expected, steps, k=5.0):
    for i in steps:
        values = recorder.per_sample[i]
        stderr = values.std() / len(values) ** 0.5
        measured = recorder.summary()["steps"][i]["mean_sq_distance"]
        assert measured == pytest.approx(float(values.mean()), rel=1e-9)  # the account is the samples' mean
        assert abs(measured - expected[i]) < k * stderr + 1e-9, (i, measured, expected[i], float(stderr))


def test_variance_account_matches_the_closed_forms(toy):
    """E||x_s - m||^2 per step: DDIM sigma^2 D; the GMM its mixture variance, clipped as METHOD.md
    says; the control sigma^2 D + s^2. Measured on 4000 samples, within 5 standard errors."""
    n, eta, scale = 4000, 0.5, 1.5
    # DDIM eq. 16 written out, independently of the sampler: t = 999, 799, ..., 199, then abar = 1
    abar = [float(a) for a in toy.alphas_cumprod.float()[[999, 799, 599, 399, 199]]] + [1.0]
    sigmas = [eta * ((1 - s) / (1 - t) * (1 - t / s)) ** 0.5 for t, s in zip(abar[:-1], abar[1:], strict=True)]

    ddim_rec = StepRecorder()
    run(toy, ddim, n=n, callback=ddim_rec, eta=eta)
    assert [ddim_rec.sigma[i] for i in range(5)] == pytest.approx(sigmas, rel=1e-6)
    within_standard_errors(ddim_rec, [s**2 * D for s in sigmas], range(5))

    gmm = GMM(dtype=torch.float64).initialize(dim=D, n_components=4, n_steps=5, scale=scale, upper_bound_vars=False)
    gmm_rec = StepRecorder()
    run(toy, ddim_gmm, n=n, callback=gmm_rec, eta=eta, gmm=gmm)
    expected = []
    for i, sigma in enumerate(sigmas):
        if i == 4:  # the last step is DDIM's
            expected.append(sigma**2 * D)
            continue
        delta, pi = gmm.offsets(i), gmm.step_parameters(i)["priors"]
        v = (pi @ delta**2)[None, :] / (len(pi) * pi[:, None])  # eq. 11
        expected.append(float(pi @ ((sigma**2 - v).clamp_min(0) + delta**2).sum(1)))
    assert any(gmm.step_clipped_fraction(i, sigmas[i]) > 0 for i in range(4))  # clipping is exercised
    within_standard_errors(gmm_rec, expected, range(5))

    control_rec = StepRecorder()
    run(toy, ddim_noise, n=n, callback=control_rec, eta=eta, scale=scale)
    within_standard_errors(control_rec, [s**2 * D + (scale**2 if i < 4 else 0) for i, s in enumerate(sigmas)], range(5))
    summary = control_rec.summary()
    assert summary["extra_per_dim"] == pytest.approx(scale**2 * 4 / 5 / D, rel=0.05)
