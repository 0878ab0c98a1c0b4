"""inpaint.py: replacement inpainting (with RePaint's resampling) and SDEdit, checked on exact
denoisers, and its bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion
import inpaint
from helpers import GaussianDenoiser, OneImageDenoiser


def process(T=100, prediction="eps"):
    return diffusion.GaussianDiffusion(None, T, "cosine", prediction)


def x_star(shape=(2, 1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.6 - 0.8


@pytest.mark.parametrize("sampler, resample", [("ddim", 1), ("ddim", 3), ("ddpm", 1)])
def test_known_pixels_come_back_exactly(sampler, resample):
    d = process(50)
    d.model = lambda x, t, y=None: torch.randn_like(x)  # any network: the known part is not its
    x0 = x_star()
    mask = inpaint.make_mask("random", 8, torch.Generator().manual_seed(1))
    out = inpaint.inpaint(d, x0, mask, sampler, steps=10, resample=resample,
                          generator=torch.Generator().manual_seed(2))
    assert torch.equal(out * mask, x0 * mask)
    assert not torch.equal(out, x0)  # ... and the network filled in the rest


@pytest.mark.parametrize("mask_name", ["bottom", "right", "center", "random"])
@pytest.mark.parametrize("resample", [1, 3])
def test_the_exact_denoiser_of_one_image_recovers_it_from_any_mask(mask_name, resample):
    d = process(100)
    target = x_star((1, 1, 8, 8))
    d.model = OneImageDenoiser(d, target.double())
    mask = inpaint.make_mask(mask_name, 8, torch.Generator().manual_seed(3))
    out = inpaint.inpaint(d, target.repeat(3, 1, 1, 1) * mask, mask, "ddim", steps=20, resample=resample,
                          generator=torch.Generator().manual_seed(4))
    assert torch.allclose(out, target.expand_as(out), atol=1e-4)


def test_repaint_goes_back_with_fresh_noise_between_the_steps():
    """resample U takes every step U times: U times the network calls, minus the last step's."""
    d = process(100)
    net = OneImageDenoiser(d, x_star((1, 1, 8, 8)).double())
    d.model = net
    mask = inpaint.make_mask("right", 8)
    inpaint.inpaint(d, torch.zeros(1, 1, 8, 8), mask, "ddim", steps=10, resample=3)
    assert net.calls == 9 * 3 + 1  # the last step (to x0) is not taken again


def test_sdedit_at_strength_0_returns_the_image_and_at_1_is_plain_sampling():
    d = process(100)
    d.model = GaussianDenoiser(d, 0.2, 0.5)
    x0 = x_star()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(inpaint.sdedit(d, x0, 0.0, noise=noise), x0)
    plain = d.ddim_sample(x0.shape, steps=20, noise=noise)
    # at t = T-1 of the cosine schedule sqrt(abar) is 1e-4: x_T is the noise, to 1e-4
    assert torch.allclose(inpaint.sdedit(d, x0, 1.0, steps=20, noise=noise), plain, atol=1e-3)
    # in between, the image's layout survives: nearer the input than plain sampling is
    half = inpaint.sdedit(d, x0, 0.3, steps=20, noise=noise)
    assert (half - x0).abs().mean() < (plain - x0).abs().mean()


# -- the script ------------------------------------------------------------------------------


def cli(tiny_runs, tmp_path, *extra):
    return inpaint.main(inpaint.parse_args(
        ["--checkpoint", str(tiny_runs / "u" / "last.pt"), "--data-dir", str(tiny_runs / "data"),
         "--indices", "0", "1", "--samples", "2", "--steps", "4", "--out-dir", str(tmp_path / "o"),
         "--device", "cpu", *extra]))


def test_the_script_writes_its_grid_and_the_completions(tiny_runs, tmp_path):
    cli(tiny_runs, tmp_path, "--mask", "bottom", "--out-npz", str(tmp_path / "c.npz"), "--resample", "2")
    assert (tmp_path / "o" / "inpaint.png").is_file()
    z = np.load(tmp_path / "c.npz")
    assert z["arr_0"].shape == (4, 28, 28, 1) and z["arr_0"].dtype == np.uint8
    assert z["originals"].shape == (2, 28, 28, 1) and z["mask"].shape == (28, 28)
    known = z["mask"][None, :, :, None]  # known pixels come back, up to the uint8 rounding
    assert (np.where(known, z["arr_0"], 0) == np.where(known, z["originals"].repeat(2, 0), 0)).all()
    cli(tiny_runs, tmp_path, "--mode", "sdedit", "--strengths", "0", "0.5")
    assert (tmp_path / "o" / "sdedit.png").is_file()


def test_an_image_and_a_mask_of_your_own(tiny_runs, tmp_path):
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(tmp_path / "img.png")
    m = np.zeros((28, 28), np.uint8)
    m[:, :10] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    out = cli(tiny_runs, tmp_path, "--image", str(tmp_path / "img.png"), "--mask", str(tmp_path / "mask.png"))
    assert out["images"].shape == (2, 1, 28, 28)


@pytest.mark.parametrize("extra, message", [
    (["--mask", "diagonal"], "does not exist"),
    (["--mask", "WHITE"], "must leave some pixels known and some unknown"),
    (["--mode", "sdedit", "--strengths", "1.5"], "--strengths must be in"),
    (["--mode", "sdedit", "--strengths", "nan"], "--strengths must be in"),
    (["--image", "SMALL"], "is 14 x 14; this model works on 28 x 28"),
    (["--indices", "0", "99999"], "--indices must be in"),
    (["--eta", "2"], "--eta must be in"),
    (["--out-npz", "c.png"], "must end in .npz"),
])
def test_bad_input_is_one_line_before_the_work(tiny_runs, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(inpaint, "inpaint", lambda *a, **k: pytest.fail("worked first"))
    monkeypatch.setattr(inpaint, "sdedit", lambda *a, **k: pytest.fail("worked first"))
    Image.fromarray(np.full((28, 28), 255, np.uint8)).save(tmp_path / "white.png")
    Image.fromarray(np.zeros((14, 14), np.uint8)).save(tmp_path / "small.png")
    extra = [{"WHITE": str(tmp_path / "white.png"), "SMALL": str(tmp_path / "small.png"),
              "c.png": str(tmp_path / "c.png")}.get(e, e) for e in extra]
    with pytest.raises(SystemExit, match=message):
        cli(tiny_runs, tmp_path, *extra)
    with pytest.raises(SystemExit, match="does not exist"):
        inpaint.main(inpaint.parse_args(["--checkpoint", str(tmp_path / "missing.pt")]))


def test_a_conditional_model_fills_in_with_guidance_and_the_completions_are_scored(tiny_runs, tmp_path, monkeypatch):
    """A class-conditional checkpoint fills each image in with its own label (or --class),
    with classifier-free guidance; --classifier gives the share in the original's class."""
    seen = []
    real = inpaint.inpaint

    def spy(d, x0, mask, sampler, steps, eta, y, guidance, *a, **k):
        seen.append((y.tolist(), guidance))
        return real(d, x0, mask, sampler, steps, eta, y, guidance, *a, **k)
    monkeypatch.setattr(inpaint, "inpaint", spy)
    report = inpaint.main(inpaint.parse_args(
        ["--checkpoint", str(tiny_runs / "c" / "last.pt"), "--data-dir", str(tiny_runs / "data"),
         "--indices", "0", "1", "--samples", "2", "--steps", "4", "--guidance", "3",
         "--classifier", str(tiny_runs / "clf.pt"), "--out-dir", str(tmp_path / "o"), "--device", "cpu"]))
    labels = inpaint.common.load_dataset("mnist", str(tiny_runs / "data"), 28, 1, split="test").labels[:2]
    assert seen == [(labels.repeat_interleave(2).tolist(), 3.0)]
    assert 0 <= report["same_class"] <= 1
    with pytest.raises(SystemExit, match="needs --indices or --count, not --image"):
        inpaint.main(inpaint.parse_args(["--checkpoint", str(tiny_runs / "c" / "last.pt"), "--image", "x.png",
                                         "--steps", "4", "--classifier", str(tiny_runs / "clf.pt"),
                                         "--out-dir", str(tmp_path / "p")]))


def test_seam_jump_measures_the_change_across_the_edge_of_the_mask():
    mask = inpaint.make_mask("right", 8)  # known: the left half
    flat = torch.zeros(2, 1, 8, 8)
    assert inpaint.seam_jump(flat, mask) == 0
    step = flat.clone()
    step[..., 4:] = 1.0  # 127.5 grey levels up where the filled half starts, nothing elsewhere
    assert inpaint.seam_jump(step, mask) == pytest.approx(127.5)
    inside = flat.clone()
    inside[..., 6:] = 1.0  # a jump inside the filled half is no seam
    assert inpaint.seam_jump(inside, mask) == 0
