"""Metric paths that need model weights, tested offline on weights the tests make themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.metrics import (
    MetricSuite,
    PixelFeatures,
    clip_score_extra,
    inception_score_extra,
    make_fid,
)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file of torch-fidelity's Inception-v3 layout with random (He-initialised) weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    original = fe.FeatureExtractorInceptionV3.load_state_dict
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    original_url = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: None
    try:
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict = original
        fe.load_state_dict_from_url = original_url
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def random_images(n, seed, size=64):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_fid_and_inception_score_from_a_local_weights_file(inception_weights):
    fid = make_fid(2048, inception_weights)
    fid.update(random_images(6, 0), real=True)
    fid.update(random_images(6, 1), real=False)
    assert np.isfinite(float(fid.compute()))
    metric, arguments = inception_score_extra(inception_weights)
    metric.update(*arguments(random_images(6, 2), None, None))
    mean, _ = metric.compute()
    assert 1 - 1e-5 <= float(mean) <= 1008  # IS lies in [1, number of classes]


def fed_inception_score(weights_path, images, **kwargs):
    metric, arguments = inception_score_extra(weights_path, **kwargs)
    metric.update(*arguments(images, None, None))
    return metric


def test_inception_score_is_reproducible_and_leaves_the_global_rng_alone(inception_weights):
    """torchmetrics shuffles the features into groups with the global RNG; the shuffle is seeded."""
    images = random_images(20, 4, size=32)
    first, second = (fed_inception_score(inception_weights, images, seed=3) for _ in range(2))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    mean, std = first.compute()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)  # whatever the global RNG holds, the same features give the same score
    assert torch.equal(torch.stack(second.compute()), torch.stack([mean, std]))
    # the seed does decide the groups: another seed splits them otherwise
    other = fed_inception_score(inception_weights, images, seed=4).compute()
    assert not torch.equal(torch.stack(other), torch.stack([mean, std]))


def test_metric_suite_seeds_the_inception_score_with_the_run_seed(inception_weights):
    images = random_images(20, 4, size=32)
    suite = MetricSuite(extras={"inception_score": inception_score_extra(inception_weights)}, seed=3)
    assert suite.extras["inception_score"].seed == 3
    suite.update(images)
    torch.manual_seed(5)
    mean, std = fed_inception_score(inception_weights, images, seed=3).compute()
    assert suite.compute() == {"inception_score": float(mean), "inception_score_std": float(std)}
    # without a seed the suite leaves the metric's own
    assert MetricSuite(extras={"is": inception_score_extra(inception_weights, seed=9)}).extras["is"].seed == 9


def test_reference_states_give_the_reference_fid():
    """Loading (mu, sigma) into the states equals FID against the real features themselves."""
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (300, 1, 2, 3), generator=g, dtype=torch.uint8)
    fake = torch.randint(40, 256, (300, 1, 2, 3), generator=g, dtype=torch.uint8)
    direct = make_fid(PixelFeatures(6))
    direct.update(real, real=True)
    direct.update(fake, real=False)
    features = real.flatten(1).double().numpy() / 255
    suite = MetricSuite(PixelFeatures(6), (features.mean(0), np.cov(features, rowvar=False)))
    suite.reset_and_load_reference(global_rank=0)
    suite.update(fake)
    # the suite feeds FID the float32 features it saves (features.npz); PixelFeatures gives float64
    assert suite.compute()["fid"] == pytest.approx(float(direct.compute()), rel=1e-6)
    # other ranks hold no reference: their states are summed into rank 0's
    suite.reset_and_load_reference(global_rank=1)
    assert int(suite.fid.real_features_num_samples) == 0


def test_clip_score_from_a_local_directory(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    metric, arguments = clip_score_extra(model=tiny_clip_dir)
    images = random_images(3, 0, size=32)
    prompts = ["a cat", "a dog", "the sea"]
    metric.update(*arguments(images, None, prompts))
    score = float(metric.compute())
    # independently: 100 * cosine similarity of the projected embeddings, averaged, floored at 0
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
        out = model(**inputs)
    cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert score == pytest.approx(max(float((100 * cosine).mean()), 0.0), rel=1e-4, abs=1e-3)
    with pytest.raises(ConfigError, match="needs prompts"):
        arguments(images, None, None)


def test_missing_clip_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be loaded offline"):
        clip_score_extra(model=str(tmp_path / "no_clip_here"))


def test_fid_stats_script_from_an_image_folder(tmp_path):
    import subprocess
    import sys

    from helpers.runs import ROOT
    from PIL import Image

    images = random_images(20, 3, size=4)
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / f"{i:03d}.png")
    out = tmp_path / "ref.npz"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "fid_stats.py"),
        "--images",
        str(tmp_path / "imgs"),
        "--features",
        "pixels",
        "--out",
        str(out),
    ]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    features = images.flatten(1).double().numpy() / 255
    with np.load(out) as ref:
        assert np.allclose(ref["mu"], features.mean(0)) and np.allclose(ref["sigma"], np.cov(features, rowvar=False))
        assert np.allclose(ref["features"], features, atol=1e-7)  # what PRDC and KID read
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr


def test_fid_stats_script_refuses_too_few_images(tmp_path):
    """One image has no covariance: refused with one line, and no file of NaN statistics written."""
    import subprocess
    import sys

    from helpers.runs import ROOT

    out = tmp_path / "ref.npz"
    cmd = [sys.executable, str(ROOT / "scripts" / "fid_stats.py"), "--model", "toy", "--n", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "error: reference statistics need at least 2 images" in proc.stderr
    assert not out.exists()
