"""ddim_compare.py, interpolate.py and timestep_analysis.py end to end on a tiny checkpoint,
and the variational bound against known answers."""

import json
import math

import numpy as np
import pytest
import torch

import ddim_compare
import diffusion
import interpolate
import timestep_analysis
from helpers import OneImageDenoiser


@pytest.fixture
def setup(tiny_runs):
    return tiny_runs


def test_ddim_compare_writes_everything(setup, tmp_path):
    root = setup
    out = tmp_path / "cmp"
    results = ddim_compare.main(ddim_compare.parse_args(
        ["--checkpoint", str(root / "u" / "last.pt"), "--steps", "2", "5", "20", "--eta", "0", "0.5",
         "--dpm-steps", "2", "5", "20",
         "--num-samples", "12", "--batch-size", "5", "--classifier", str(root / "clf.pt"),
         "--save-npz", "--device", "cpu", "--out-dir", str(out), "--data-dir", str(root / "data")]))
    names = [r["setting"] for r in results]
    assert names == ["ddpm_20", "ddim_2", "ddim_5", "ddim_20", "ddim_2_eta0.5", "ddim_5_eta0.5", "ddim_20_eta0.5",
                     "dpm++_2", "dpm++_5", "dpm++_20"]
    by = {r["setting"]: r for r in results}
    assert by["ddim_20"]["distance_to_ddim_T"] == 0.0  # it is the reference
    assert by["ddim_2"]["distance_to_ddim_T"] > 0
    assert all(r["fid"] is not None and r["fid"] >= 0 and r["images_per_s"] > 0 for r in results)
    for f in ("comparison_grid.png", "quality_vs_steps.png", "time_vs_steps.png", "results.csv", "results.json",
              "ddim_2.npz", "ddpm_20.npz", "ddim_5_eta0.5.npz"):
        assert (out / f).is_file(), f
    with np.load(out / "ddim_2.npz") as z:
        assert z["arr_0"].shape == (12, 28, 28, 1) and z["arr_0"].dtype == np.uint8
    assert len(json.loads((out / "results.json").read_text())["results"]) == 10
    # DPM-Solver++ over all T = 20 steps is close to the ODE solution that DDIM-20 gives
    assert by["dpm++_20"]["distance_to_ddim_T"] < by["dpm++_2"]["distance_to_ddim_T"]


def test_ddim_compare_same_noise_gives_the_same_ddim_samples(setup, tmp_path):
    root = setup
    args = ["--checkpoint", str(root / "c" / "last.pt"), "--steps", "4", "--no-ddpm", "--no-fid",
            "--num-samples", "6", "--class", "3", "--device", "cpu"]
    a = ddim_compare.main(ddim_compare.parse_args([*args, "--out-dir", str(tmp_path / "a"), "--save-npz"]))
    ddim_compare.main(ddim_compare.parse_args([*args, "--out-dir", str(tmp_path / "b"), "--save-npz",
                                                   "--batch-size", "4"]))
    assert a[0]["fid"] is None
    with np.load(tmp_path / "a" / "ddim_4.npz") as za, np.load(tmp_path / "b" / "ddim_4.npz") as zb:
        assert np.array_equal(za["arr_0"], zb["arr_0"])  # batching does not change the result


def test_ddim_compare_bad_input(setup, tmp_path):
    root = setup
    ck = str(root / "u" / "last.pt")
    with pytest.raises(SystemExit, match=r"must be in \[1, 20\]"):
        ddim_compare.main(ddim_compare.parse_args(["--checkpoint", ck, "--steps", "50", "--no-fid"]))
    with pytest.raises(SystemExit, match="--class needs a class-conditional"):
        ddim_compare.main(ddim_compare.parse_args(["--checkpoint", ck, "--class", "3", "--no-fid", "--steps", "2"]))
    with pytest.raises(SystemExit, match="train-classifier"):
        ddim_compare.main(ddim_compare.parse_args(["--checkpoint", ck, "--steps", "2",
                                                   "--classifier", str(tmp_path / "none.pt")]))


def test_slerp_keeps_the_norm_and_lerp_does_not():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 1, 28, 28, generator=g), torch.randn(1, 1, 28, 28, generator=g)
    assert torch.allclose(interpolate.slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(interpolate.slerp(a, b, 1.0), b, atol=1e-5)
    mid_s, mid_l = interpolate.slerp(a, b, 0.5), interpolate.lerp(a, b, 0.5)
    assert mid_s.norm() / a.norm() == pytest.approx(1.0, abs=0.05)
    assert mid_l.norm() / a.norm() == pytest.approx(math.sqrt(0.5), abs=0.05)


def test_interpolate_all_modes(setup, tmp_path):
    root = setup
    out = tmp_path / "i"
    report = interpolate.main(interpolate.parse_args(
        ["--checkpoint", str(root / "c" / "last.pt"), "--frames", "5", "--steps", "20", "--device", "cpu",
         "--out-dir", str(out), "--data-dir", str(root / "data")]))
    for name in ("noise", "image", "class"):
        assert (out / f"{name}_interpolation.png").is_file() and (out / f"{name}_interpolation.gif").is_file()
    assert report["noise"]["midpoint_norm_lerp"] < 0.8 < report["noise"]["midpoint_norm_slerp"]
    assert report["images"]["reconstruction_mae"] >= 0
    from PIL import Image
    assert Image.open(out / "noise_interpolation.gif").n_frames == 5 + 3  # forward and back
    with pytest.raises(SystemExit, match="class-conditional"):
        interpolate.main(interpolate.parse_args(["--checkpoint", str(root / "u" / "last.pt"), "--mode", "classes", "--steps", "5",
                                                 "--device", "cpu", "--out-dir", str(out)]))


def test_variational_bound_terms_are_nonnegative_and_trained_beats_untrained():
    torch.manual_seed(0)
    T = 1000
    x_star = (torch.randint(0, 256, (1, 1, 8, 8)).float() / 127.5 - 1)  # on the 8-bit grid
    x0 = x_star.repeat(4, 1, 1, 1)
    exact = diffusion.GaussianDiffusion(None, T, "cosine")
    exact.model = OneImageDenoiser(exact, x_star)  # the perfect model of a one-image data set
    untrained = diffusion.GaussianDiffusion(diffusion.DiffusionModel(image_size=8, hidden_dims=(8, 16), time_dim=16).eval(),
                                            T, "cosine")
    g = torch.Generator().manual_seed(1)
    good = timestep_analysis.variational_bound(exact, x0, generator=g)
    bad = timestep_analysis.variational_bound(untrained, x0, generator=g)
    for r in (good, bad):
        assert (r["kl"] >= -1e-4).all() and (r["prior"] >= 0).all() and (r["decoder"] >= 0).all()
        assert r["evaluated_t"] == list(range(T - 1, 0, -1))
    # the perfect model pays only for the prior and a sharp decoder
    assert good["kl"].abs().max() < 1e-2
    assert bad["bits_per_dim"].mean() > 10 * good["bits_per_dim"].mean()
    assert bad["bits_per_dim"].mean() > 1.0
    strided = timestep_analysis.variational_bound(untrained, x0, stride=4, generator=g)
    assert strided["evaluated_t"] == list(range(T - 1, 0, -4))


def test_gaussian_kl_and_discretized_nll_against_closed_forms():
    m1, v1, m2, v2 = torch.tensor(0.3), torch.tensor(0.5), torch.tensor(-0.2), torch.tensor(2.0)
    closed = math.log(math.sqrt(2.0) / math.sqrt(0.5)) + (0.5 + 0.25) / (2 * 2.0) - 0.5
    assert timestep_analysis.gaussian_kl(m1, v1, m2, v2).item() == pytest.approx(closed, rel=1e-6)
    assert timestep_analysis.gaussian_kl(m1, v1, m1, v1).item() == pytest.approx(0, abs=1e-7)
    # the probabilities of all 256 bins sum to 1
    grid = torch.arange(256).float() / 127.5 - 1
    nll = timestep_analysis.discretized_gaussian_nll(grid, torch.full_like(grid, 0.1), torch.full_like(grid, 0.09))
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_timestep_analysis_end_to_end(setup, tmp_path):
    root = setup
    out = tmp_path / "t"
    report = timestep_analysis.main(timestep_analysis.parse_args(
        ["--checkpoint", str(root / "u" / "last.pt"), "--loss-images", "8", "--loss-points", "5",
         "--vlb-images", "4", "--trajectory-samples", "2", "--snapshots", "4", "--device", "cpu",
         "--out-dir", str(out), "--data-dir", str(root / "data")]))
    for f in ("forward_process.png", "schedules.png", "stable_targets.png", "loss_per_timestep.png", "vlb_terms.png",
              "trajectory.png", "trajectory.gif", "ddim_eta.png", "self_conditioning.png", "optimizer_steps.png",
              "analysis.json"):
        assert (out / f).is_file(), f
    # Muon's step spreads over all directions: its singular values lie far closer together
    # than the gradient's (divided by the largest, all three lists start at 1)
    assert len(report["optimizer_steps"]) == 3
    for values in report["optimizer_steps"].values():
        g, adamw, muon = values.values()
        assert g[0] == adamw[0] == muon[0] == pytest.approx(1)
        assert min(muon) > 0.5 and min(muon) > 3 * min(g)
    v = report["vlb"]
    assert v["bits_per_dim"] > 0 and v["prior_bpd"] >= 0 and v["decoder_bpd"] >= 0
    assert v["bits_per_dim"] == pytest.approx(v["prior_bpd"] + v["kl_sum_bpd"] + v["decoder_bpd"], rel=1e-4)
    assert len(report["loss_per_timestep"]) == 5
    # the self-conditioned tiny model: its loss without the estimate is drawn beside it
    assert report["loss_per_timestep_without_estimate"].keys() == report["loss_per_timestep"].keys()
    assert report["loss_per_timestep_without_estimate"] != report["loss_per_timestep"]
    # without a checkpoint: only the data figures
    r = timestep_analysis.main(timestep_analysis.parse_args(["--out-dir", str(tmp_path / "n"), "--data-dir",
                                                             str(root / "data")]))
    assert "vlb" not in r and (tmp_path / "n" / "schedules.png").is_file()
    # stable targets: the usual target at t = 0 (x_t shows its own image), the weight spread
    # over most of the images and the target moved near pure noise
    st = r["stable_targets"]
    assert st["t"][0] == 0 and st["v_shift_mse"][0] < 1e-8 and st["images_sharing_weight"][0] == pytest.approx(1)
    assert st["v_shift_mse"][-1] > 0.01 and st["images_sharing_weight"][-1] > 10


def test_loss_per_timestep_is_the_training_loss(setup):
    """The curve shows the quantity the model was trained on, written out here by hand from
    the network itself: at each t the mean square of v - v_pred, with x_t from Eq. 4 and, for a
    self-conditioned model, its own clipped first guess of x0 (or, asked, zeros)."""
    import common
    ckpt = common.load_checkpoint(setup / "u" / "last.pt")
    model, d, _ = common.model_from_checkpoint(ckpt, "cpu")
    assert d.prediction == "v" and model.self_cond
    T = ckpt["diffusion"]["timesteps"]
    abar = torch.tensor(np.cumprod(1 - diffusion.cosine_beta_schedule(T)), dtype=torch.float32)
    x0 = torch.rand(6, 1, 28, 28) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    ts, losses = timestep_analysis.loss_per_timestep(d, x0, 3, seed=4)
    _, blind = timestep_analysis.loss_per_timestep(d, x0, 3, seed=4, p_self_cond=0.0)
    for t, value, value_blind in zip(ts, losses, blind):
        a, s, tt = abar[t].sqrt(), (1 - abar[t]).sqrt(), torch.full((6,), t)
        xt, v = a * x0 + s * noise, a * noise - s * x0
        with torch.no_grad():
            first = model(xt, tt)  # no estimate: zeros
            guess = (a * xt - s * first).clamp(-1, 1)  # x0 from v
            second = model(xt, tt, x0_self=guess)
        assert value == pytest.approx(((v - second) ** 2).mean().item(), rel=1e-4)
        assert value_blind == pytest.approx(((v - first) ** 2).mean().item(), rel=1e-4)


def test_self_conditioning_figure_feeds_the_estimate_or_zeros(setup, tmp_path):
    """Row 1 is the plain DDIM-50 of the self-conditioned model; row 2 the same network from
    the same noise given zeros at every step, which is what a sampler unaware of
    self-conditioning would do."""
    import common
    ckpt = common.load_checkpoint(setup / "u" / "last.pt")
    model, d, module = common.model_from_checkpoint(ckpt, "cpu")
    cfg = ckpt["model_config"]
    fed, zeros = timestep_analysis.self_conditioning_figure(module, d, cfg, 3, tmp_path / "sc.png", n=2)
    xT = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(3))
    assert torch.equal(fed, d.ddim_sample(xT.shape, steps=min(50, d.num_timesteps), noise=xT))
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("x0_self")), with_kwargs=True)
    timestep_analysis.self_conditioning_figure(module, d, cfg, 3, tmp_path / "sc.png", n=2)
    steps = min(50, d.num_timesteps)
    assert all(e is None for e in seen[steps:]) and all(e is not None for e in seen[1:steps])
    assert not torch.equal(fed, zeros) and (tmp_path / "sc.png").is_file()


def test_ddim_compare_without_a_classifier_skips_the_scores_with_a_note(setup, tmp_path, monkeypatch, capsys):
    """Comparing samplers needs no classifier: without one the FID column is left out, and a
    line says how to add it."""
    monkeypatch.chdir(tmp_path)  # no runs/classifiers/mnist.pt here
    ddim_compare.main(ddim_compare.parse_args(
        ["--checkpoint", str(setup / "u" / "last.pt"), "--steps", "2", "--no-ddpm", "--no-dpm",
         "--num-samples", "4", "--distance-samples", "0", "--out-dir", str(tmp_path / "d"), "--device", "cpu"]))
    out = capsys.readouterr().out
    assert "note: no FID column" in out and "python evaluate.py train-classifier --dataset mnist" in out
    assert (tmp_path / "d" / "comparison_grid.png").is_file()
