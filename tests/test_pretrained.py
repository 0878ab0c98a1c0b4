"""The shipped weights (pretrained/) and export.py, which makes such files."""

from pathlib import Path

import pytest
import torch

import common
import export
import train_diffusion

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"
SHIPPED = sorted(PRETRAINED.glob("*.pt"))


def test_a_model_of_each_data_set_is_shipped():
    assert [p.name for p in SHIPPED] == ["cifar10.pt", "mnist.pt"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_each_shipped_file_is_small_weights_only_and_samples_images(path):
    assert path.stat().st_size < 4e6
    ckpt = common.load_checkpoint(path)  # weights_only=True, and every check of a checkpoint
    assert "optimizer" not in ckpt and "model" not in ckpt
    assert all(v.dtype == torch.float16 for v in ckpt["ema"]["shadow"].values() if v.is_floating_point())
    _, process, _ = common.model_from_checkpoint(ckpt, "cpu")
    cfg = ckpt["model_config"]
    n = 4
    noise = torch.randn(n, cfg["channels"], cfg["image_size"], cfg["image_size"],
                        generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % cfg["num_classes"] if cfg.get("num_classes") else None
    x = common.sample(process, "ddim", noise.shape, steps=10, y=y, noise=noise)
    assert x.shape == noise.shape and torch.isfinite(x).all()
    if ckpt["kind"] == "mnist":
        # digits: white strokes on a black ground. About 80% of an MNIST image is black; noise,
        # or a broken model, is not
        black = (x < -0.9).float().mean().item()
        assert 0.6 < black < 0.95, black
    else:
        # natural images use the whole range in every channel, not one grey
        assert x.std().item() > 0.25


def test_a_shipped_file_cannot_be_trained_on():
    with pytest.raises(SystemExit, match="weights-only model can be sampled from, not trained on"):
        train_diffusion.main(train_diffusion.parse_args(
            ["--resume", str(PRETRAINED / "mnist.pt"), "--device", "cpu"]))


def test_export_keeps_the_ema_weights_in_float16_and_measures_the_change(tiny_runs, tmp_path):
    source = tiny_runs / "u" / "last.pt"
    small = export.main(export.parse_args(["--checkpoint", str(source), "--out", str(tmp_path / "s.pt"),
                                           "--check-samples", "4", "--steps", "4", "--device", "cpu"]))
    ckpt = torch.load(source, weights_only=True)
    written = common.load_checkpoint(tmp_path / "s.pt")
    assert (tmp_path / "s.pt").stat().st_size < source.stat().st_size / 3
    for k, v in ckpt["ema"]["shadow"].items():
        if v.is_floating_point():
            assert written["ema"]["shadow"][k].dtype == torch.float16
            torch.testing.assert_close(written["ema"]["shadow"][k].float(), v, atol=1e-3, rtol=1e-3)
    assert small["trained"]["optimizer_steps"] == ckpt["state"]["step"]
    assert small["trained"]["float16_change"]["mean"] <= 0.5
    # an exported file is never written over a checkpoint, and a tolerance of 0 refuses any change
    with pytest.raises(SystemExit, match="holds a checkpoint"):
        export.main(export.parse_args(["--checkpoint", str(source), "--out", str(source)]))
    with pytest.raises(SystemExit, match="export with --dtype float32"):
        export.main(export.parse_args(["--checkpoint", str(source), "--out", str(tmp_path / "t.pt"),
                                       "--check-samples", "4", "--steps", "4", "--tolerance", "-1",
                                       "--device", "cpu"]))
    assert not (tmp_path / "t.pt").exists()


@pytest.fixture(scope="module")
def cifar_data(tmp_path_factory):
    """Tiny CIFAR-10 image folders and a classifier of them, for the shipped CIFAR-10 model."""
    import evaluate
    from helpers import write_cifar10_jpeg
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_jpeg(root / "data", n_train=4, n_test=2)
    evaluate.main(evaluate.parse_args(["train-classifier", "--dataset", "cifar10", "--data-dir", str(root / "data"),
                                       "--epochs", "1", "--out", str(root / "clf.pt"), "--device", "cpu"]))
    return root


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_the_sampling_scripts_take_each_shipped_model(path, request, tmp_path):
    import ddim_compare
    import evaluate
    import inpaint
    import interpolate
    import timestep_analysis
    kind = common.load_checkpoint(path)["kind"]
    runs = request.getfixturevalue("tiny_runs" if kind == "mnist" else "cifar_data")
    ckpt, data = str(path), str(runs / "data")
    report = evaluate.main(evaluate.parse_args(
        ["--checkpoint", ckpt, "--num-samples", "4", "--steps", "2", "--data-dir", data,
         "--features", "classifier", "--classifier", str(runs / "clf.pt"), "--device", "cpu"]))
    assert report["num_samples"] == 4
    rows = ddim_compare.main(ddim_compare.parse_args(
        ["--checkpoint", ckpt, "--steps", "2", "--no-ddpm", "--no-dpm", "--num-samples", "2",
         "--distance-samples", "0", "--device", "cpu", "--out-dir", str(tmp_path / "c")]))
    assert [r["setting"] for r in rows] == ["ddim_2"]
    interpolate.main(interpolate.parse_args(
        ["--checkpoint", ckpt, "--mode", "noise", "--frames", "2", "--steps", "2", "--device", "cpu",
         "--out-dir", str(tmp_path / "i")]))
    inpaint.main(inpaint.parse_args(
        ["--checkpoint", ckpt, "--count", "1", "--samples", "1", "--steps", "2", "--data-dir", data,
         "--device", "cpu", "--out-dir", str(tmp_path / "p")]))
    timestep_analysis.main(timestep_analysis.parse_args(
        ["--checkpoint", ckpt, "--loss-images", "2", "--loss-points", "3", "--vlb-images", "1",
         "--vlb-stride", "250", "--trajectory-sampler", "ddim", "--trajectory-samples", "1",
         "--snapshots", "2", "--data-dir", data, "--device", "cpu", "--out-dir", str(tmp_path / "t")]))
    assert (tmp_path / "i" / "noise_interpolation.png").is_file() and any((tmp_path / "p").glob("*.png"))
    assert (tmp_path / "t" / "trajectory.png").is_file()
