"""The variance account kept per sample on disk: a resumed run's account covers every sample of
the run, each counted once, and says how many samples it covers."""

from __future__ import annotations

import pytest
import torch

from ddim_gmm_exp.controls import VarianceAccount, load_sample_account, save_sample_account
from ddim_gmm_exp.models.toy import ToyGMMModel
from ddim_gmm_exp.noise import randn, sample_generators
from ddim_gmm_exp.samplers import DiffusionSchedule, ddim

SHAPE = (3, 4, 4)
D = 48


@pytest.fixture(scope="module")
def toy():
    return ToyGMMModel.random(shape=SHAPE, n_modes=3, seed=0)


def flat(summary: dict) -> dict:
    """A summary's numbers in one flat dict (pytest.approx compares no nested lists)."""
    steps = {(p["step"], k): v for p in summary["steps"] for k, v in p.items()}
    return {k: v for k, v in summary.items() if k != "steps"} | steps


def assert_same_account(summary: dict, expected: dict) -> None:
    """Two summaries equal up to the order of summation."""
    assert flat(summary) == pytest.approx(flat(expected), rel=1e-9)


def sample_into(toy, indices: list[int], account: VarianceAccount) -> None:
    """DDIM at eta 0.5 of these global indices (per-sample generators), reporting to account."""
    generators = sample_generators(indices)
    x = randn((len(indices), *SHAPE), generators)
    schedule = DiffusionSchedule(list(range(999, -1, -200)), toy.alphas_cumprod.float(), torch.tensor(1.0))
    ddim(lambda x, t: toy.apply_model(x, t, None), x, schedule, generator=generators, callback=account, eta=0.5)


def batch_account(toy, indices: list[int], directory) -> VarianceAccount:
    account = VarianceAccount(D, per_sample={})
    sample_into(toy, indices, account)
    save_sample_account(account, indices, directory)
    return account


def test_the_account_on_disk_is_the_account_of_the_samples(toy, tmp_path):
    whole = VarianceAccount(D)
    sample_into(toy, list(range(30)), whole)
    for indices in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], list(range(10, 30))):
        batch_account(toy, indices, tmp_path)
    batch_account(toy, [8, 9, 10, 11], tmp_path)  # a killed run's batch, sampled again: counted once
    loaded = load_sample_account(tmp_path, range(30), D).summary()
    expected = whole.on_cpu().summary()
    assert loaded["num_samples"] == expected["num_samples"] == 30
    assert_same_account(loaded, expected)


def test_a_subset_of_the_samples(toy, tmp_path):
    batch_account(toy, list(range(20)), tmp_path)
    subset = VarianceAccount(D)
    sample_into(toy, list(range(5, 12)), subset)
    loaded = load_sample_account(tmp_path, range(5, 12), D)
    assert_same_account(loaded.summary(), subset.on_cpu().summary())


def test_samples_without_records_are_left_out_and_counted(toy, tmp_path):
    batch_account(toy, list(range(10)), tmp_path)
    summary = load_sample_account(tmp_path, range(25), D).summary()
    assert summary["num_samples"] == 10
    assert load_sample_account(tmp_path / "none", range(25), D).summary() == {}


def test_a_batch_account_merges_into_the_run_account(toy):
    run = VarianceAccount(D)
    for indices in (list(range(6)), list(range(6, 10))):
        batch = VarianceAccount(D, per_sample={})
        sample_into(toy, indices, batch)
        run = run.merged(batch)
    whole = VarianceAccount(D)
    sample_into(toy, list(range(10)), whole)
    assert_same_account(run.on_cpu().summary(), whole.on_cpu().summary())
    assert run.summary()["num_samples"] == 10
