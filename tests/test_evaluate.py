"""evaluate.py: the Frechet distance against closed forms, input loading, and the end-to-end report."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train_diffusion
from helpers import write_cifar10_jpeg, write_mnist


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = evaluate.gaussian_stats(f)
    assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)


def test_fid_matches_closed_form_for_diagonal_gaussians():
    # For diagonal covariances: ||mu1 - mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(closed, rel=1e-9)
    # and from samples of those Gaussians, approximately
    rng = np.random.default_rng(1)
    a = mu1 + np.sqrt(s1) * rng.normal(size=(200000, 3))
    b = mu2 + np.sqrt(s2) * rng.normal(size=(200000, 3))
    est = evaluate.frechet_distance(*evaluate.gaussian_stats(a), *evaluate.gaussian_stats(b))
    assert est == pytest.approx(closed, rel=0.02)


def test_fid_rises_steadily_with_noise():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(2000, 8))
    ref = evaluate.gaussian_stats(base)
    fids = [evaluate.frechet_distance(*evaluate.gaussian_stats(base + s * rng.normal(size=base.shape)), *ref)
            for s in (0.0, 0.3, 0.6, 1.0, 2.0)]
    assert fids[0] == pytest.approx(0, abs=1e-8)
    assert all(a < b for a, b in zip(fids, fids[1:]))


def test_class_report_entropy_and_confidence():
    probs = np.zeros((40, 10))
    probs[np.arange(40), np.arange(40) % 4] = 0.95  # 4 classes used evenly, confident
    probs[np.arange(40), 9] += 0.05
    probs[:10, :] = 0.1  # 10 unsure samples (argmax 0)
    r = evaluate.class_report(probs, requested=np.arange(40) % 4)
    assert r["confident_share"] == 0.75
    assert sum(r["class_histogram"]) == 40
    p = np.array(r["class_histogram"]) / 40
    assert r["class_entropy_bits"] == pytest.approx(-(p[p > 0] * np.log2(p[p > 0])).sum())
    assert r["requested_class_share"] == pytest.approx((np.array([0] * 10 + [k % 4 for k in range(10, 40)]) == np.arange(40) % 4).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny data set, a classifier trained on it, and a tiny diffusion checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    write_mnist(root / "data", n_train=200, n_test=100)
    clf = root / "clf.pt"
    report = evaluate.main(evaluate.parse_args(["train-classifier", "--data-dir", str(root / "data"),
                                                "--epochs", "50", "--out", str(clf), "--device", "cpu"]))
    train_diffusion.main(train_diffusion.parse_args(
        ["--hidden-dims", "8", "16", "16", "--time-dim", "16", "--batch-size", "32", "--val-size", "16",
         "--timesteps", "50", "--sample-steps", "5", "--device", "cpu", "--epochs", "1",
         "--class-cond", "--data-dir", str(root / "data"), "--out-dir", str(root / "run")]))
    return root, clf, report


def test_classifier_learns_the_data(trained):
    _, _, report = trained
    assert report["test_accuracy"] > 0.9


def test_real_test_images_score_well_and_noise_scores_badly(trained, tmp_path):
    root, clf, _ = trained
    real, labels = evaluate.dataset_nhwc("mnist", root / "data", "test")
    np.savez(tmp_path / "real.npz", arr_0=real)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    common_args = ["--classifier", str(clf), "--device", "cpu", "--data-dir", str(root / "data")]
    r_real = evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "real.npz"), *common_args,
                                                "--json", str(tmp_path / "r.json")]))
    r_noise = evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "noise.npz"), *common_args]))
    assert r_real["fid"] == pytest.approx(0, abs=1e-3)  # the reference is this very split
    assert r_noise["fid"] > 10 * max(r_real["fid"], 1.0)
    assert r_real["confident_share"] > 0.8
    assert json.loads((tmp_path / "r.json").read_text())["num_samples"] == len(real)


def test_png_folder_gives_the_same_report_as_npz(trained, tmp_path):
    root, clf, _ = trained
    real, _ = evaluate.dataset_nhwc("mnist", root / "data", "test")
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(real[:50]):
        Image.fromarray(im[..., 0]).save(folder / f"{i:04d}.png")
    np.savez(tmp_path / "s.npz", arr_0=real[:50])
    a = evaluate.main(evaluate.parse_args(["--samples", str(folder), "--classifier", str(clf), "--device", "cpu"]))
    b = evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "s.npz"), "--classifier", str(clf), "--device", "cpu"]))
    assert a["fid"] == pytest.approx(b["fid"]) and a["num_samples"] == 50


def test_checkpoint_samples_are_scored_with_requested_classes(trained, tmp_path):
    root, clf, _ = trained
    r = evaluate.main(evaluate.parse_args(["--checkpoint", str(root / "run" / "last.pt"), "--num-samples", "20",
                                           "--steps", "5", "--classifier", str(clf), "--device", "cpu",
                                           "--save-npz", str(tmp_path / "drawn.npz")]))
    assert r["num_samples"] == 20 and "requested_class_share" in r and r["fid"] > 0
    with np.load(tmp_path / "drawn.npz") as z:
        assert z["arr_0"].shape == (20, 28, 28, 1) and z["arr_0"].dtype == np.uint8


@pytest.mark.parametrize("array, message", [
    (np.zeros((10, 28, 28, 1), np.float32), "must be uint8"),
    (np.zeros((10, 28, 28), np.uint8), "N x H x W x C"),
    (np.zeros((10, 32, 32, 3), np.uint8), "mnist samples must be N x 28 x 28 x 1"),
    (np.zeros((1, 28, 28, 1), np.uint8), "at least 2 samples"),
])
def test_bad_sample_arrays(trained, tmp_path, array, message):
    _, clf, _ = trained
    np.savez(tmp_path / "bad.npz", arr_0=array)
    with pytest.raises(SystemExit, match=message):
        evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "bad.npz"), "--classifier", str(clf)]))


def test_bad_files(trained, tmp_path):
    _, clf, _ = trained
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "missing.npz")]))
    np.savez(tmp_path / "nokey.npz", images=np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(SystemExit, match="no arr_0"):
        evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "nokey.npz")]))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="could not read"):
        evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "junk.npz")]))
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(SystemExit, match="train one first"):
        evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "ok.npz"),
                                           "--classifier", str(tmp_path / "none.pt")]))
    with pytest.raises(SystemExit, match="not a classifier"):
        evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "ok.npz"),
                                           "--classifier", str(tmp_path / "junk.npz")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .png files"):
        evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "empty")]))


# -- CIFAR-10: the classifier-feature path, on tiny JPEG class folders -----------------------


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).repeat(50, 1, 1, 1)
    y = evaluate.random_crop_flip(x, pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    windows = {(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)}
    seen = set()
    for i in range(len(x)):
        match = [(dy, dx, f) for dy, dx, f in windows
                 if torch.equal(y[i], (lambda w: w.flip(2) if f else w)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert match, f"image {i} is not a window of its padded input"
        seen.add(match[0])
    assert len(seen) > 30  # shifts and flips differ from image to image


@pytest.fixture(scope="module")
def cifar_trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cifar")
    write_cifar10_jpeg(root / "data", n_train=16, n_test=8)
    clf = root / "clf.pt"
    report = evaluate.main(evaluate.parse_args(["train-classifier", "--dataset", "cifar10", "--data-dir",
                                                str(root / "data"), "--epochs", "20", "--batch-size", "32", "--out", str(clf),
                                                "--device", "cpu"]))
    return root, clf, report


def test_cifar_classifier_learns_and_baselines_order_as_expected(cifar_trained, tmp_path):
    root, clf, report = cifar_trained
    assert report["test_accuracy"] >= 0.8
    scores = {}
    for name in ("test", "train", "blur", "noise"):
        scores[name] = evaluate.main(evaluate.parse_args(
            ["--baseline", name, "--dataset", "cifar10", "--num-samples", "80", "--features", "classifier",
             "--classifier", str(clf), "--data-dir", str(root / "data"), "--device", "cpu",
             "--save-grid", str(tmp_path / f"{name}.png")]))
    assert "NOT Inception FID" in scores["noise"]["fid_features"]
    assert Image.open(tmp_path / "blur.png").size == (8 * 34 + 2, 8 * 34 + 2)  # 64 images, 8 x 8
    # the reference is the test split: its own 80 images are closest, noise is far off
    assert scores["test"]["fid"] < scores["train"]["fid"] < scores["noise"]["fid"]
    assert scores["blur"]["fid"] < scores["noise"]["fid"]
    assert scores["train"]["confident_share"] > scores["noise"]["confident_share"]
    assert scores["noise"]["class_entropy_bits"] < scores["train"]["class_entropy_bits"]
    # the same seed gives the same images; blur keeps each 2x2 block's mean colour
    a = evaluate.baseline_images("blur", "cifar10", root / "data", 5)
    b = evaluate.baseline_images("train", "cifar10", root / "data", 5)
    assert np.array_equal(a, evaluate.baseline_images("blur", "cifar10", root / "data", 5))
    block_means = lambda im: im.astype(float).reshape(5, 16, 2, 16, 2, 3).mean((2, 4))
    assert np.abs(block_means(a) - block_means(b)).mean() < 8
    assert np.abs(a.astype(float) - b).mean() > 2
    with pytest.raises(SystemExit, match="more than the"):
        evaluate.baseline_images("train", "cifar10", root / "data", 10 ** 6)


def test_cifar_checkpoint_scored_with_the_classifier(cifar_trained, trained, tmp_path, monkeypatch):
    import diffusion_cifar
    import train_diffusion_cifar
    root, clf, _ = cifar_trained
    monkeypatch.setitem(diffusion_cifar.PRESETS, "cpu", dict(
        image_size=32, channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(), dropout=0.0))
    train_diffusion_cifar.main(train_diffusion_cifar.parse_args(
        ["--data-dir", str(root / "data"), "--out-dir", str(tmp_path / "run"), "--class-cond",
         "--batch-size", "32", "--val-size", "20", "--timesteps", "40", "--sample-steps", "4",
         "--max-steps", "2", "--device", "cpu"]))
    r = evaluate.main(evaluate.parse_args(
        ["--checkpoint", str(tmp_path / "run" / "last.pt"), "--num-samples", "20", "--steps", "4",
         "--features", "classifier", "--classifier", str(clf), "--device", "cpu",
         "--data-dir", str(root / "data")]))
    assert r["dataset"] == "cifar10" and r["num_samples"] == 20 and r["fid"] > 0
    assert "requested_class_share" in r and "NOT Inception FID" in r["fid_features"]
    # an MNIST classifier is refused for CIFAR-10 samples, before any sampling
    with pytest.raises(SystemExit, match="was trained on mnist, not cifar10"):
        evaluate.main(evaluate.parse_args(
            ["--checkpoint", str(tmp_path / "run" / "last.pt"), "--num-samples", "20", "--steps", "4",
             "--features", "classifier", "--classifier", str(trained[1]), "--device", "cpu"]))


def test_feature_space_choice(monkeypatch, capsys):
    import importlib.util
    assert evaluate.feature_space("mnist", "auto") == "classifier"
    with pytest.raises(SystemExit, match="--features inception is for cifar10"):
        evaluate.feature_space("mnist", "inception")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert evaluate.feature_space("cifar10", "auto") == "classifier"
    assert "pytorch-fid is not installed" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert evaluate.feature_space("cifar10", "auto") == "inception"
    assert evaluate.feature_space("cifar10", "classifier") == "classifier"


def test_save_unsure_shows_the_least_confident_samples(trained, tmp_path):
    """--save-unsure draws the samples with the lowest top probability, least sure first."""
    root, clf, _ = trained
    real, _ = evaluate.dataset_nhwc("mnist", root / "data", "test")
    np.savez(tmp_path / "real.npz", arr_0=real[:40])
    report = evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "real.npz"), "--classifier", str(clf),
                                                "--device", "cpu", "--save-unsure", str(tmp_path / "unsure.png")]))
    assert Image.open(tmp_path / "unsure.png").size[0] > 0 and report["num_samples"] == 40
    # top probabilities 0.9, 0.55, 0.6, 0.55, 0.95: the two at 0.55 (in their order), then 0.6
    probs = np.array([[0.9, 0.1], [0.45, 0.55], [0.6, 0.4], [0.55, 0.45], [0.05, 0.95]])
    assert list(evaluate.save_unsure_grid(real[:5], probs, tmp_path / "u.png", n=3)) == [1, 3, 2]
    assert len(evaluate.save_unsure_grid(real[:5], probs, tmp_path / "u.png")) == 5  # n > samples: all


def test_save_unsure_needs_the_classifier(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(SystemExit, match="--save-unsure needs the project classifier"):
        evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "s.npz"), "--dataset", "cifar10",
                                           "--features", "inception", "--save-unsure", str(tmp_path / "u.png")]))
