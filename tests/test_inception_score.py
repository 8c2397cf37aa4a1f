"""The Inception Score depends on the images only: not on the order they were scored in, how they
were split over ranks, or what a resumed run scored first (its features are ordered by global
sample index before the seeded shuffle into groups)."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.image.inception import InceptionScore

from ddim_gmm_exp.metrics import MetricSuite, PixelFeatures, SeededInceptionScore, inception_score_extra


class Logits(torch.nn.Module):
    """A small classifier's logits over the pixels (fixed random weights): cheap, and per image."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(3 * 4 * 4, 10, generator=generator), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 4 * (images.flatten(1).double() / 255 - 0.5) @ self.weight.double()


N = 60
IMAGES = torch.randint(0, 256, (N, 3, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def score(parts: list[torch.Tensor], seed: int = 3) -> tuple[float, float]:
    """IS of the images fed in batches of these global indices, on one metric."""
    metric = SeededInceptionScore(feature=Logits(), seed=seed)
    for indices in parts:
        metric.update(IMAGES[indices], indices=indices)
    return tuple(float(v) for v in metric.compute())


def test_the_score_does_not_depend_on_the_order_images_are_scored_in():
    in_order = score(list(torch.arange(N).split(20)))
    shuffled = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    assert score(list(shuffled.split(7))) == pytest.approx(in_order, rel=1e-9)
    # as a resumed run scores them: the images on disk first, then the rest
    assert score([torch.arange(20, 40), torch.arange(0, 20), torch.arange(40, N)]) == pytest.approx(in_order, rel=1e-9)


def test_two_ranks_merged_give_the_score_of_one():
    """Two metric objects (the shards of two ranks, interleaved as a distributed sampler deals
    them), merged as the metric sync gathers them: the score of one rank."""
    one = score([torch.arange(N)])
    ranks = [SeededInceptionScore(feature=Logits(), seed=3) for _ in range(2)]
    for rank, metric in enumerate(ranks):
        for indices in torch.arange(rank, N, 2).split(10):
            metric.update(IMAGES[indices], indices=indices)
    ranks[1].merge_state(ranks[0])  # rank 0's states after rank 1's: gather order is not index order
    assert tuple(float(v) for v in ranks[1].compute()) == pytest.approx(one, rel=1e-9)


def test_the_score_is_torchmetrics_inception_score_of_the_features_in_index_order():
    """The computation itself is torchmetrics', with the global RNG seeded as the run's seed."""
    reference = InceptionScore(feature=Logits())
    reference.update(IMAGES)
    torch.manual_seed(3)
    expected = tuple(float(v) for v in reference.compute())
    assert score([torch.arange(N).flip(0)]) == pytest.approx(expected, rel=1e-12)
    assert score([torch.arange(N)], seed=4) != pytest.approx(expected, rel=1e-6)  # the seed decides the groups


def test_without_indices_the_feed_order_is_the_order():
    metric = SeededInceptionScore(feature=Logits(), seed=3)
    for part in IMAGES.split(25):
        metric.update(part)
    assert tuple(float(v) for v in metric.compute()) == pytest.approx(score([torch.arange(N)]), rel=1e-12)


def test_the_metric_suite_passes_the_global_indices():
    def suite_score(order: torch.Tensor) -> dict[str, float]:
        suite = MetricSuite(extras={"is": inception_score_extra(logits=Logits())}, seed=3)
        for indices in order.split(15):
            suite.update(IMAGES[indices], indices=indices)
        return suite.compute()

    in_order = suite_score(torch.arange(N))
    assert in_order == pytest.approx(suite_score(torch.arange(N).flip(0)), rel=1e-9)
    assert in_order["is"] == pytest.approx(score([torch.arange(N)])[0], rel=1e-12)


def test_any_classifier_can_be_scored():
    metric, arguments = inception_score_extra(logits=PixelFeatures(48))
    metric.update(*arguments(IMAGES, None, None))
    mean, _ = metric.compute()
    assert 1 <= float(mean) <= 48
