"""metrics.fid.antialias: Inception's resize to 299 x 299, antialiased (torchmetrics' default, every
earlier run's) or TF 1.x's (false: ADM's, EDM's and torch-fidelity's statistics). Tested offline on
an Inception-v3 weights file of random weights; the cheap 64-d features (three convolutions after
the resize) show what the resize does."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers.runs import ROOT, SMALL, compose_config

from ddim_gmm_exp import checks
from ddim_gmm_exp.config import resolve_run
from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.metrics import (
    FeatureSpace,
    InceptionFeatures,
    extractor_key,
    file_sha256,
    folder_reference,
    inception_extractor,
    inception_score_extra,
    load_reference_features,
    make_fid,
)
from ddim_gmm_exp.runner import build_adapter, build_metrics, fid_reference


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """A weights file of torch-fidelity's Inception-v3 layout, random: He-initialised weights, identity
    batch norms. The layout is read off a module built on the meta device (no memory, no init cost)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    original, original_url = fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None  # no weights exist offline
    fe.load_state_dict_from_url = lambda *a, **k: None
    try:
        with torch.device("meta"):
            layout = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"]).state_dict()
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url = original, original_url
    generator, state = torch.Generator().manual_seed(0), {}
    for name, value in layout.items():
        if value.ndim > 1:  # convolutions and the classifier
            state[name] = torch.randn(value.shape, generator=generator) * (2 / value[0].numel()) ** 0.5
        elif name.endswith(("running_var", ".weight")):
            state[name] = torch.ones(value.shape, dtype=value.dtype)
        else:  # biases, running means, batch counts
            state[name] = torch.zeros(value.shape, dtype=value.dtype)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def nets(inception_weights) -> tuple[InceptionFeatures, InceptionFeatures]:
    """(antialiased, TF 1.x) Inception 64-d features of the same weights."""
    return InceptionFeatures(64, inception_weights), inception_extractor(64, inception_weights, antialias=False)


def images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_false_gives_torch_fidelitys_features_and_true_torchmetrics_default(nets, inception_weights):
    """The TF 1.x resize is torch-fidelity's own extractor's, to the bit; the default is another resize."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    antialiased, tf = nets
    assert antialiased.antialias and not tf.antialias and isinstance(tf, InceptionFeatures)
    fidelity = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], inception_weights)
    x = images()
    with torch.no_grad():
        expected = fidelity(x)[0]
        assert torch.equal(tf(x), expected)
        assert not torch.allclose(antialiased(x), expected, atol=1e-4)


def test_fid_takes_the_resize(inception_weights):
    """(The Inception Score's is checked where the runner builds it, below.)"""
    assert make_fid(64, inception_weights, antialias=False).inception.use_antialias is False
    with pytest.raises(ConfigError, match="antialias=False is not used with logits"):
        inception_score_extra(logits=torch.nn.Identity(), antialias=False)


def test_the_default_keeps_its_keys_and_the_tf_resize_has_its_own(nets, inception_weights, tmp_path):
    antialiased, tf = nets
    # the default is the int extractor, whose key is what earlier caches were made under
    assert inception_extractor(2048, inception_weights) == 2048
    assert extractor_key(2048, inception_weights) == f"inception-2048|weights-sha256={file_sha256(inception_weights)}"
    default_key = extractor_key(antialiased)  # features.npz's key (FeatureSpace): no resize named
    assert "antialias" not in default_key
    assert extractor_key(tf) == default_key + "|antialias=false"
    assert FeatureSpace(tf).features_key() != FeatureSpace(antialiased).features_key()
    # the same folder of images gets one reference cache per resize, each of its own features
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(images(3, size=16, seed=1)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / f"{i}.png")
    with_default = folder_reference(tmp_path / "imgs", antialiased, tmp_path / "cache", inception_weights)
    with_tf = folder_reference(tmp_path / "imgs", tf, tmp_path / "cache", inception_weights)
    assert with_default != with_tf
    assert not np.allclose(load_reference_features(with_default), load_reference_features(with_tf), atol=1e-4)


def spec_of(overrides: list[str], tmp_path, cache_dir):
    overrides = [*SMALL, *overrides]
    return resolve_run(compose_config(overrides, tmp_path, cache_dir), overrides, None)


def test_settings_name_it_only_when_false(inception_weights, tmp_path, cache_dir):
    inception = ["metrics=inception", f"metrics.fid.weights_path={inception_weights}"]
    default = spec_of(inception, tmp_path, cache_dir)
    tf = spec_of([*inception, "metrics.fid.antialias=false"], tmp_path, cache_dir)
    assert default.metrics.fid_antialias is True and tf.metrics.fid_antialias is False
    # the default's scores fingerprint and settings are those of runs from before the key
    before = {k: v for k, v in vars(default.metrics).items() if k != "fid_antialias"}
    assert default.scores_fingerprint()["metrics"] == before
    assert "metrics.fid.antialias" not in default.settings()
    assert tf.settings()["metrics.fid.antialias"] is False
    assert tf.scores_fingerprint() != default.scores_fingerprint() and tf.fingerprint() == default.fingerprint()
    checks.check_paths_and_metrics(tf)
    # the Inception Score's factory, as metrics=inception names it, is the one the runner passes the resize
    factory = tf.metrics.extra["inception_score"]["factory"]
    assert checks.reads_inception_resize(factory)
    assert factory["_target_"] == f"{inception_score_extra.__module__}.{inception_score_extra.__qualname__}"


@pytest.mark.parametrize(
    "overrides,message",
    [
        # the toy's FID is in its own pixel features: nothing is resized by Inception
        (["metrics.fid.antialias=false"], "metrics.fid.antialias=false is not used by model=toy's own features"),
        (["metrics.fid.enabled=false", "metrics.fid.antialias=false"], "metrics.fid.antialias=false is not used: "),
        (["metrics.fid.antialias=maybe"], "metrics.fid.antialias='maybe' is not allowed: it must be true"),
    ],
)
def test_refused_where_unused_or_not_a_bool(overrides, message, tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=message):
        checks.check_paths_and_metrics(spec_of(overrides, tmp_path, cache_dir))


@pytest.mark.parametrize("overrides", [[], ["metrics.fid.antialias=true"]])
def test_the_default_is_never_refused(overrides, tmp_path, cache_dir):
    checks.check_paths_and_metrics(spec_of(overrides, tmp_path, cache_dir))


def test_the_runner_builds_fid_and_the_inception_score_with_the_resize(inception_weights, tmp_path, cache_dir):
    base = ["metrics=inception", f"metrics.fid.weights_path={inception_weights}", "metrics.fid.antialias=false"]
    # the Inception Score alone (FID off) uses the setting: allowed, and its Inception resizes as TF 1.x
    spec = spec_of([*base, "metrics.fid.enabled=false"], tmp_path, cache_dir)
    checks.check_paths_and_metrics(spec)
    adapter = build_adapter(spec.model)
    suite, _ = build_metrics(spec.metrics, spec.model, adapter, 100, 0)
    assert suite.extras["inception_score"].inception.use_antialias is False and not suite.spaces
    # FID's extractor against given statistics: the TF-resize module (the default keeps the int)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    spec = spec_of([*base, f"metrics.fid.reference={tmp_path / 'ref.npz'}"], tmp_path, cache_dir)
    extractor, path = fid_reference(spec.metrics, spec.model, adapter)
    assert isinstance(extractor, InceptionFeatures) and not extractor.antialias and path == tmp_path / "ref.npz"
    default = spec_of([*base[:-1], f"metrics.fid.reference={tmp_path / 'ref.npz'}"], tmp_path, cache_dir)
    assert fid_reference(default.metrics, default.model, adapter)[0] == 2048


def test_fid_stats_takes_the_resize_and_records_it(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("fid_stats", ROOT / "scripts" / "fid_stats.py")
    fid_stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid_stats)
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(images(3, size=4, seed=2)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / f"{i}.png")
    args = ["--images", str(tmp_path / "imgs"), "--features", "pixels", "--out", str(tmp_path / "ref.npz")]
    assert fid_stats.main([*args, "--no-antialias"]) == 2
    assert "error: --no-antialias is not used by --features pixels features" in capsys.readouterr().err
    assert not (tmp_path / "ref.npz").exists()
    assert fid_stats.main(args) == 0  # the key says what made the statistics
    with np.load(tmp_path / "ref.npz") as data:
        assert str(data["key"]).startswith("fid_stats|ddim_gmm_exp.metrics.PixelFeatures-48|")
