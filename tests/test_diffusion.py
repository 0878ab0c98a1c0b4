"""The math of diffusion.py and diffusion_cifar.py, checked against independent computations.

Every test of the process runs on both modules (the fixture D), so their copies cannot drift.
"""

import math

import numpy as np
import pytest
import torch

import diffusion
import diffusion_cifar
from helpers import GaussianDenoiser, OneImageDenoiser


@pytest.fixture(params=[diffusion, diffusion_cifar], ids=["mnist", "cifar"])
def D(request):
    return request.param


def make(D, timesteps=1000, schedule="cosine", prediction="eps"):
    return D.GaussianDiffusion(lambda x, t, y=None: torch.zeros_like(x), timesteps, schedule, prediction)


def x_star(shape=(2, 1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.6 - 0.8  # inside [-1, 1], away from the clip


# -- schedules -----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alphas_cumprod_is_running_product(D, schedule):
    d = make(D, schedule=schedule)
    betas = D.SCHEDULES[schedule](1000)
    running = 1.0
    for t in range(0, 1000, 37):  # a brute-force loop at a sample of timesteps
        running = np.prod(1 - betas[: t + 1])
        assert d.alphas_cumprod[t].item() == pytest.approx(running, rel=1e-5)
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])  # strictly decreasing
    assert torch.all((d.alphas_cumprod > 0) & (d.alphas_cumprod < 1))
    assert torch.all((d.betas > 0) & (d.betas < 1))
    assert d.alphas_cumprod_prev[0] == 1.0
    assert torch.equal(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])


def test_linear_schedule_matches_ddpm_endpoints(D):
    betas = D.linear_beta_schedule(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert betas.dtype == np.float64
    assert np.allclose(np.diff(betas), np.diff(betas)[0])


def test_cosine_schedule_matches_closed_form_before_clipping(D):
    T, s = 1000, 0.008
    abar = np.cumprod(1 - D.cosine_beta_schedule(T, s))
    for t in range(0, T - 20, 50):  # paper t = code t + 1; the clip only bites at the end
        closed = math.cos(((t + 1) / T + s) / (1 + s) * math.pi / 2) ** 2 / \
            math.cos(s / (1 + s) * math.pi / 2) ** 2
        assert abar[t] == pytest.approx(closed, rel=1e-9)
    assert D.cosine_beta_schedule(T, s).max() == pytest.approx(0.999)


def test_unknown_schedule_is_rejected(D):
    with pytest.raises(ValueError, match="schedule"):
        make(D, schedule="quadratic")


# -- forward process and posterior -------------------------------------------------------------


def test_q_sample_mean_and_variance(D):
    d = make(D)
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for t_val in (0, 300, 999):
        t = torch.full((20000,), t_val)
        xt = d.q_sample(x0, t)
        abar = d.alphas_cumprod[t_val].item()
        assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - abar, abs=0.02 + 0.03 * (1 - abar))


def test_posterior_mean_eq7_equals_eq11_with_true_noise(D):
    d = make(D, schedule="linear")
    torch.manual_seed(1)
    x0 = torch.randn(4, 1, 5, 5)
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 500, 999])
    xt = d.q_sample(x0, t, noise)
    x0_rec = d.predict_x0_from_eps(xt, t, noise)
    assert torch.allclose(x0_rec, x0, atol=1e-3)
    mean7, var = d.q_posterior(x0_rec, xt, t)
    # DDPM Eq. 11 written out independently: 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps)
    a = d.alphas[t].view(-1, 1, 1, 1)
    b = d.betas[t].view(-1, 1, 1, 1)
    ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    mean11 = (xt - b / (1 - ab).sqrt() * noise) / a.sqrt()
    assert torch.allclose(mean7, mean11, atol=1e-4)
    abp = d.alphas_cumprod_prev[t].view(-1, 1, 1, 1)
    assert torch.allclose(var, (1 - abp) / (1 - ab) * b, rtol=1e-3)


def test_eps_and_x0_conversions_are_inverse(D):
    d = make(D)
    x = torch.randn(3, 1, 4, 4)
    eps = torch.randn_like(x)
    t = torch.tensor([0, 400, 998])
    x0 = d.predict_x0_from_eps(x, t, eps)
    assert torch.allclose(d.predict_eps_from_x0(x, t, x0), eps, atol=1e-3)


def test_v_conversions_recover_x0_and_eps(D):
    d = make(D, prediction="v")
    x0, eps = x_star((3, 1, 4, 4)), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = d.q_sample(x0, t, eps)
    v = d.velocity(x0, t, eps)
    x0_rec, eps_rec = d.x0_and_eps_from_v(xt, t, v)
    assert torch.allclose(x0_rec, x0, atol=1e-5) and torch.allclose(eps_rec, eps, atol=1e-5)
    # v is a rotation of (eps, x0): |v|^2 + |xt|^2 = |eps|^2 + |x0|^2
    assert torch.allclose(v.pow(2) + xt.pow(2), eps.pow(2) + x0.pow(2), atol=1e-5)
    # the loss target: a network that outputs the exact v has zero loss
    d.model = lambda x, tt: d.velocity(x0, tt, eps)
    assert d.loss(x0, t=t, noise=eps).item() < 1e-10


def test_v_prediction_is_edm_preconditioning_with_sigma_data_one(D):
    """Karras et al. 2022, Table 1: D(y) = c_skip y + c_out F(c_in y), y = x0 + sigma eps, loss
    weight lambda = (sigma^2 + sd^2) / (sigma sd)^2. With sd = 1 and sigma = sqrt((1-abar)/abar)
    the network sees x_t, its target is -v, and lambda c_out^2 = 1: the plain v-MSE."""
    d = make(D, prediction="v")
    x0, eps = x_star((3, 1, 4, 4)), torch.randn(3, 1, 4, 4)
    t = torch.tensor([3, 400, 990])
    abar = d.alphas_cumprod[t].double()[:, None, None, None]
    sigma, sd = ((1 - abar) / abar).sqrt(), 1.0
    y = x0 + sigma * eps
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in, lam = 1 / (sigma ** 2 + sd ** 2).sqrt(), (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    edm_target = (x0 - c_skip * y) / c_out  # what F must output for D(y) = x0
    assert torch.allclose(c_in * y, d.q_sample(x0, t, eps).double(), atol=1e-5)
    assert torch.allclose(edm_target, -d.velocity(x0, t, eps).double(), atol=1e-4)
    assert torch.allclose(lam * c_out ** 2, torch.ones_like(lam))


def test_v_prediction_keeps_x0_defined_in_pure_noise(D):
    """At t = T-1, x0 from eps divides by sqrt(abar) ~ 5e-5: an eps error of 0.01 becomes an
    x0 error of ~200. From v the same error stays ~0.01. This is why v suits the cosine schedule."""
    x0, noise = x_star((1, 1, 4, 4)), torch.randn(1, 1, 4, 4)
    t = torch.tensor([999])
    err = 0.01 * torch.randn(1, 1, 4, 4)
    errors = {}
    for prediction in ("eps", "v"):
        d = make(D, prediction=prediction)
        xt = d.q_sample(x0, t, noise)
        exact = noise if prediction == "eps" else d.velocity(x0, t, noise)
        d.model = lambda x, tt, y=None: exact + err
        x0_pred, _ = d.predict_x0_and_eps(xt, 999, None, 1.0, clip_x0=False)
        errors[prediction] = (x0_pred - x0).abs().max().item()
    assert errors["eps"] > 10 and errors["v"] < 0.05


def test_unknown_prediction_is_rejected(D):
    with pytest.raises(ValueError, match="prediction"):
        make(D, prediction="x0")


def test_ddim_eta1_over_all_steps_gives_posterior_variance(D):
    d = make(D, timesteps=200)
    abar = d.alphas_cumprod.double()
    for t in range(1, 200):
        sigma = d.ddim_sigma(abar[t].item(), abar[t - 1].item(), eta=1.0)
        assert sigma ** 2 == pytest.approx(d.posterior_variance[t].item(), rel=1e-4)
    assert d.ddim_sigma(abar[5].item(), abar[4].item(), eta=0.0) == 0.0


# -- samplers --------------------------------------------------------------------------------


def test_ddim_timesteps_are_even_and_end_at_zero(D):
    assert D.ddim_timesteps(1000, 1) == [999]
    assert D.ddim_timesteps(1000, 2) == [999, 0]
    seq = D.ddim_timesteps(1000, 10)
    assert seq[0] == 999 and seq[-1] == 0 and len(set(seq)) == 10
    assert max(np.diff(seq)) - min(np.diff(seq)) <= 1
    assert D.ddim_timesteps(50, 50) == list(range(49, -1, -1))
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            D.ddim_timesteps(1000, bad)


@pytest.mark.parametrize("steps", [1, 10, 1000])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_returns_the_one_image_with_exact_denoiser(D, steps, eta, prediction):
    d = make(D, prediction=prediction)
    xs = x_star()
    d.model = net = OneImageDenoiser(d, xs, prediction)
    out = d.ddim_sample(xs.shape, steps=steps, eta=eta, generator=torch.Generator().manual_seed(0))
    # one step divides by sqrt(abar_{T-1}) ~ 1e-2 in float32, so it is less exact
    assert torch.allclose(out, xs, atol=1e-3 if steps > 1 else 1e-2)
    assert net.calls == steps
    assert net.ts == D.ddim_timesteps(1000, steps)
    if steps > 1:
        assert net.ts[-1] == 0


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_returns_the_one_image_with_exact_denoiser(D, variance, prediction):
    d = make(D, timesteps=100, prediction=prediction)
    xs = x_star()
    d.model = net = OneImageDenoiser(d, xs, prediction)
    out = d.ddpm_sample(xs.shape, generator=torch.Generator().manual_seed(0), variance=variance)
    assert net.calls == 100 and net.ts == list(range(99, -1, -1))
    # the last step adds no noise, so the one image comes back exactly
    assert torch.allclose(out, xs, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta0", "ddim_eta1"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_samplers_reproduce_a_gaussian_data_distribution(D, sampler, prediction):
    """With the exact denoiser of N(mu, s^2), samples must have mean mu and std s.

    The stochastic samplers are exact only as T grows (beta-tilde is the right reverse
    variance for a point mass, not for a spread), so use the full T = 1000."""
    d = make(D, timesteps=1000, schedule="linear", prediction=prediction)
    mu, s = 0.3, 0.2
    d.model = GaussianDenoiser(d, mu, s, prediction)
    g = torch.Generator().manual_seed(0)
    shape = (4000, 1, 2, 2)
    if sampler == "ddpm":
        out = d.ddpm_sample(shape, generator=g, clip_x0=False)
    else:
        out = d.ddim_sample(shape, steps=1000, eta=1.0 if sampler == "ddim_eta1" else 0.0,
                            generator=g, clip_x0=False)
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(s, abs=0.01)


def test_ddim_eta0_is_deterministic_and_seeded(D):
    d = make(D, timesteps=100)
    d.model = GaussianDenoiser(d, 0.1, 0.5)
    a = d.ddim_sample((2, 1, 4, 4), steps=20, generator=torch.Generator().manual_seed(3))
    b = d.ddim_sample((2, 1, 4, 4), steps=20, generator=torch.Generator().manual_seed(3))
    c = d.ddim_sample((2, 1, 4, 4), steps=20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(2, 1, 4, 4)
    assert torch.equal(d.ddim_sample(noise.shape, steps=20, noise=noise),
                       d.ddim_sample(noise.shape, steps=20, noise=noise))
    # with eta > 0 the same generator seed still gives the same images
    e1 = d.ddim_sample((2, 1, 4, 4), steps=20, eta=1.0, generator=torch.Generator().manual_seed(5))
    e2 = d.ddim_sample((2, 1, 4, 4), steps=20, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(e1, e2)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_inversion_then_sampling_reconstructs(D, prediction):
    d = make(D, timesteps=1000, prediction=prediction)
    d.model = GaussianDenoiser(d, 0.1, 0.5, prediction)
    x0 = x_star((3, 1, 6, 6), seed=7)  # arbitrary images, not the data mean
    errors = {}
    for steps in (10, 100, 1000):
        xT = d.ddim_invert(x0, steps=steps)
        assert xT.std() > 0.5  # it really is noise-like, not x0 itself
        rec = d.ddim_sample(x0.shape, steps=steps, noise=xT, clip_x0=False)
        errors[steps] = (rec - x0).abs().max().item()
    # Euler steps of the DDIM ODE: the round-trip error falls about 10x per 10x steps
    assert errors[1000] < 5e-3
    assert errors[1000] < errors[100] / 5 < errors[10] / 25


# -- DPM-Solver++(2M) -------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 10, 100, 1000])
def test_logsnr_timesteps_are_distinct_descend_to_zero_and_even_in_lambda(D, steps):
    d = make(D)
    abar = d.alphas_cumprod_f64
    seq = D.logsnr_timesteps(abar, steps)
    assert len(seq) == steps and seq[0] == 999 and (steps == 1 or seq[-1] == 0)
    assert all(a > b for a, b in zip(seq, seq[1:]))
    if steps == 10:  # away from rounding, the gaps in lambda are equal
        lam = 0.5 * np.log(abar[seq] / (1 - abar[seq]))
        gaps = np.diff(lam)
        assert gaps.min() > 0 and gaps[1:-1].max() / gaps[1:-1].min() < 1.3
        # evenly spaced t would put one step in the last 10% of t; log-SNR puts several there
        assert sum(t < 100 for t in seq) >= 3
    with pytest.raises(ValueError):
        D.logsnr_timesteps(abar, 0)


@pytest.mark.parametrize("steps", [1, 10, 1000])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_returns_the_one_image_with_exact_denoiser(D, steps, prediction):
    d = make(D, prediction=prediction)
    xs = x_star()
    d.model = net = OneImageDenoiser(d, xs, prediction)
    out = d.dpm_solver_sample(xs.shape, steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, xs, atol=1e-3 if steps > 1 else 1e-2)
    assert net.calls == steps  # the multistep update reuses the last prediction: no extra calls
    assert net.ts == D.logsnr_timesteps(d.alphas_cumprod_f64, steps)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_beats_ddim_on_the_exact_gaussian_ode(D, schedule, prediction):
    """Data ~ N(0, s^2): x_t / sqrt(abar_t s^2 + 1 - abar_t) is constant along the
    probability-flow ODE, so x_0 = x_T s / sqrt(abar_T s^2 + 1 - abar_T) exactly."""
    d = make(D, schedule=schedule, prediction=prediction)
    s = 0.3
    d.model = GaussianDenoiser(d, 0.0, s, prediction)
    xT = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    abar_T = d.alphas_cumprod_f64[-1]
    exact = xT.double() * s / math.sqrt(abar_T * s ** 2 + 1 - abar_T)
    inside = exact.abs() < 0.95  # the samplers clamp their output to [-1, 1]
    errors = {}
    for steps in (10, 20):
        ddim = d.ddim_sample(xT.shape, steps=steps, noise=xT, clip_x0=False)
        dpm = d.dpm_solver_sample(xT.shape, steps=steps, noise=xT, clip_x0=False)
        uniform = d.dpm_solver_sample(xT.shape, steps=steps, noise=xT, clip_x0=False, spacing="uniform")
        errors[steps] = [(x.double() - exact)[inside].abs().max().item() for x in (ddim, dpm, uniform)]
        assert errors[steps][1] <= 0.5 * errors[steps][0], errors
        # where it evaluates matters as much as its order: on DDIM's evenly spaced t the same
        # solver is several times worse than on timesteps evenly spaced in log-SNR
        assert errors[steps][1] < errors[steps][2] / 2.5, errors


def test_dpm_solver_is_deterministic_and_its_first_step_is_ddim(D):
    d = make(D, timesteps=100)
    d.model = GaussianDenoiser(d, 0.1, 0.5)
    a = d.dpm_solver_sample((2, 1, 4, 4), steps=8, generator=torch.Generator().manual_seed(3))
    b = d.dpm_solver_sample((2, 1, 4, 4), steps=8, generator=torch.Generator().manual_seed(3))
    c = d.dpm_solver_sample((2, 1, 4, 4), steps=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # first order (no previous prediction) is DDIM with eta = 0: the same x at the next timestep
    x = torch.randn(2, 1, 4, 4)
    x_dpm, _ = d.dpm_solver_step(x, 99, 60, clip_x0=False)
    x_ddim, _ = d.ddim_step(x, 99, 60, eta=0.0, clip_x0=False)
    assert torch.allclose(x_dpm, x_ddim, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_matches_an_independent_implementation_of_algorithm_2(D, prediction):
    """Lu et al. 2022, Alg. 2, written out here in float64 with the paper's symbols."""
    d = make(D, timesteps=1000, prediction=prediction)
    net = lambda x, t, y=None: torch.tanh(1.7 * x + 0.3) * (0.5 + t.float().view(-1, 1, 1, 1) / 2000)
    d.model = net
    steps = 6
    xT = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = d.dpm_solver_sample(xT.shape, steps=steps, noise=xT, clip_x0=False)

    abar = d.alphas_cumprod_f64
    ts = D.logsnr_timesteps(abar, steps)
    alpha = [math.sqrt(abar[t]) for t in ts] + [1.0]  # t_M: the data itself, sigma = 0
    sigma = [math.sqrt(1 - abar[t]) for t in ts] + [0.0]

    def data_prediction(x, i):  # x_theta(x, t_i) from the network's eps or v
        f = net(x.float(), torch.full((x.shape[0],), ts[i])).double()
        if prediction == "eps":
            return (x - sigma[i] * f) / alpha[i]
        return alpha[i] * x - sigma[i] * f

    lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1])]
    x = xT.double()
    x0_prev = data_prediction(x, 0)
    h = lam[1] - lam[0]
    x = sigma[1] / sigma[0] * x - alpha[1] * (math.exp(-h) - 1) * x0_prev  # line 4
    for i in range(2, steps + 1):
        x0_cur = data_prediction(x, i - 1)
        if i < steps:
            h_prev, h = h, lam[i] - lam[i - 1]
            r = h_prev / h
            D_i = (1 + 1 / (2 * r)) * x0_cur - 1 / (2 * r) * x0_prev  # line 7
            x = sigma[i] / sigma[i - 1] * x - alpha[i] * (math.exp(-h) - 1) * D_i  # line 8
        else:  # the final step to sigma = 0 has h = infinity: first order, x = x_theta
            x = x0_cur
        x0_prev = x0_cur
    # float32 network calls against float64 here; with eps, x0 divides by alpha ~ 5e-5 at t = T-1
    assert torch.allclose(out.double(), x.clamp(-1, 1), atol=1e-3)


def test_trajectory_records_every_step(D):
    d = make(D, timesteps=50)
    xs = x_star()
    d.model = OneImageDenoiser(d, xs)
    out, traj = d.ddim_sample(xs.shape, steps=5, return_trajectory=True)
    assert traj["t"] == D.ddim_timesteps(50, 5)
    assert traj["xt"].shape == (5, *xs.shape) and traj["x0_pred"].shape == (5, *xs.shape)
    assert torch.allclose(traj["x0_pred"][-1], xs, atol=1e-4)
    out, traj = d.ddpm_sample(xs.shape, return_trajectory=True)
    assert len(traj["t"]) == 50 and traj["xt"].shape[0] == 50


def test_clip_x0_keeps_prediction_in_range(D):
    d = make(D, timesteps=50)
    far = torch.full((1, 1, 2, 2), 3.0)  # a "data set" outside [-1, 1]
    d.model = OneImageDenoiser(d, far)
    clipped = d.ddim_sample(far.shape, steps=5, clip_x0=True, return_trajectory=True)[1]
    free = d.ddim_sample(far.shape, steps=5, clip_x0=False, return_trajectory=True)[1]
    assert clipped["x0_pred"].abs().max() <= 1.0 + 1e-6
    assert free["x0_pred"].abs().max() > 2.9
    out = d.ddpm_sample(far.shape)
    assert out.abs().max() <= 1.0  # samples are returned in [-1, 1]


def test_classifier_free_guidance_combines_outputs(D):
    d = make(D, timesteps=10)
    calls = []

    def model(x, t, y):
        calls.append(y.tolist())
        return torch.where((y == D.NULL_CLASS).view(-1, 1, 1, 1), torch.ones_like(x), 3 * torch.ones_like(x))

    d.model = model
    y = torch.tensor([2, 5])
    eps = d.guided_output(torch.zeros(2, 1, 2, 2), 4, y, guidance=2.5)
    # eps_uncond + w (eps_cond - eps_uncond) = 1 + 2.5 * (3 - 1) = 6
    assert torch.allclose(eps, torch.full_like(eps, 6.0))
    assert calls == [[2, 5, -1, -1]]  # one batched call with the null class appended
    d.ddim_sample((2, 1, 2, 2), steps=4, y=y, guidance=2.5)
    assert len(calls) == 1 + 4  # still one network call per step


def test_drop_labels_replaces_a_share_p_uncond_by_the_null_class(D):
    g = torch.Generator().manual_seed(0)
    y = D.drop_labels(torch.full((4000,), 3), 0.25, g)
    assert (y == D.NULL_CLASS).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert set(y.tolist()) == {3, D.NULL_CLASS}
    assert D.drop_labels(None, 0.5) is None and torch.equal(D.drop_labels(y, 0.0), y)


def test_loss_is_algorithm_1_written_out(D):
    """L_simple by hand: x_t from Eq. 4, then the mean square of (target - network output),
    for a network that is a fixed affine map of x_t, so the output is known exactly."""
    for prediction in ("eps", "v"):
        d = make(D, 100, "cosine", prediction)
        d.model = lambda x, t, y=None: 0.3 * x + 0.01 * t.view(-1, 1, 1, 1)
        x0, t = x_star((3, 1, 4, 4)), torch.tensor([0, 50, 99])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
        abar = torch.tensor(np.cumprod(1 - D.cosine_beta_schedule(100)))[t].view(-1, 1, 1, 1).float()
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        target = noise if prediction == "eps" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        out = 0.3 * xt + 0.01 * t.view(-1, 1, 1, 1)
        assert d.loss(x0, t=t, noise=noise).item() == pytest.approx(((target - out) ** 2).mean().item(), rel=1e-5)


# -- self-conditioning (MNIST module) ---------------------------------------------------------


class SelfConditionedGaussian(GaussianDenoiser):
    """The exact Gaussian denoiser, posing as a self-conditioned network: it records the
    estimate it is given and ignores it."""
    self_cond = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def __call__(self, x, t, y=None, x0_self=None):
        self.seen.append(None if x0_self is None else x0_self.clone())
        return super().__call__(x, t, y)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver"])
def test_samplers_feed_a_self_conditioned_network_the_last_x0(sampler):
    """Chen et al. 2022, Alg. 2: step i sees the x0 that step i - 1 predicted (clipped to
    [-1, 1]), the first step sees none; the sampler's own update is unchanged."""
    d = diffusion.SelfConditionedDiffusion(None, 100, "cosine", "v")
    net = SelfConditionedGaussian(d, 0.1, 2.0, "v")  # data spread wider than [-1, 1]
    d.model = net
    plain = diffusion.GaussianDiffusion(GaussianDenoiser(d, 0.1, 2.0, "v"), 100, "cosine", "v")
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    kw = dict(noise=noise, clip_x0=False, generator=torch.Generator().manual_seed(1))
    kw_plain = dict(kw, generator=torch.Generator().manual_seed(1))
    if sampler == "ddpm":
        out, traj = d.ddpm_sample(noise.shape, return_trajectory=True, **kw)
        ref = plain.ddpm_sample(noise.shape, **kw_plain)
    elif sampler == "ddim":
        out, traj = d.ddim_sample(noise.shape, steps=10, return_trajectory=True, **kw)
        ref = plain.ddim_sample(noise.shape, steps=10, **kw_plain)
    else:
        out, traj = d.dpm_solver_sample(noise.shape, steps=10, return_trajectory=True, **kw)
        ref = plain.dpm_solver_sample(noise.shape, steps=10, **kw_plain)
    assert torch.equal(out, ref)
    assert net.seen[0] is None and len(net.seen) == len(traj["t"])
    assert traj["x0_pred"].abs().max() > 1  # so the clip below is tested
    for i in range(1, len(net.seen)):
        assert torch.equal(net.seen[i], traj["x0_pred"][i - 1].clamp(-1, 1))
    assert d.x0_prev is None and not d.in_chain  # a chain forgets its estimate at the end
    # with guidance both halves of the batched call see the same estimate
    with d.chain():
        d.x0_prev = noise
        d.guided_output(noise, 5, torch.tensor([1, 2, 3]), guidance=2.0)
    assert torch.equal(net.seen[-1], torch.cat([noise, noise]).clamp(-1, 1))


def test_self_conditioning_loss_trains_only_the_second_call():
    """Chen et al. 2022, Alg. 1: with p_self_cond = 1 the network first guesses x0 from zeros
    without a gradient, then is trained on (x_t, clipped guess); with 0 only the first call."""
    calls = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7))

        def forward(self, x, t, y=None, x0_self=None):
            calls.append((x0_self, torch.is_grad_enabled()))
            return self.w * x + (0 if x0_self is None else 0.5 * x0_self)

    net = Net()
    d = diffusion.SelfConditionedDiffusion(net, 100, "cosine", "v", p_self_cond=1.0)
    x0 = x_star((4, 1, 3, 3))
    t = torch.tensor([99, 70, 30, 5])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)) * 2
    loss = d.loss(x0, t=t, noise=noise)
    loss.backward()
    # the same by hand: x_t, the first guess of x0 from v, its clip, the second call's v
    a = d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s = d.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a * x0 + s * noise
    guess = (a * xt - s * 0.7 * xt).clamp(-1, 1)  # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
    assert guess.abs().max() == 1  # the clip matters here
    pred = 0.7 * xt + 0.5 * guess
    target = a * noise - s * x0
    assert [c[1] for c in calls] == [False, True] and calls[0][0] is None
    assert torch.allclose(calls[1][0], guess, atol=1e-6)
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-5)
    # the gradient reaches w through the second call only (d pred / d w = x_t)
    assert net.w.grad.item() == pytest.approx((2 * (pred - target) * xt).mean().item(), rel=1e-4)
    calls.clear()
    d.p_self_cond = 0.0
    d.loss(x0, t=t, noise=noise)
    assert len(calls) == 1 and calls[0][0] is None
    # p 0.5: half the batches take the two calls, the coins drawn from the process's generator
    d.p_self_cond, d.generator = 0.5, torch.Generator().manual_seed(0)
    calls.clear()
    for _ in range(400):
        d.loss(x0, t=t, noise=noise)
    assert (len(calls) - 400) / 400 == pytest.approx(0.5, abs=0.08)
    first = len(calls)
    d.generator.manual_seed(0)
    calls.clear()
    state = torch.get_rng_state()
    for _ in range(400):
        d.loss(x0, t=t, noise=noise)
    assert len(calls) == first and torch.equal(torch.get_rng_state(), state)  # the global stream untouched


# -- stable targets (MNIST module) ---------------------------------------------------------------


def bayes_x0(d, xt, t, pool, prior=None):
    """E[x0 | x_t] over the pool images by Bayes' rule, written out in float64 with the Gaussian
    density of Eq. 4: an independent check of posterior_mean_x0."""
    out = []
    for i in range(len(xt)):
        a = d.sqrt_alphas_cumprod[t[i]].double()
        s = d.sqrt_one_minus_alphas_cumprod[t[i]].double()
        logp = torch.distributions.Normal(a * pool.double(), s).log_prob(xt[i].double()).flatten(1).sum(1)
        if prior is not None:
            logp = logp + prior[i].double().log()
        w = (logp - logp.max()).exp()
        out.append((w[:, None, None, None] * pool.double()).sum(0) / w.sum())
    return torch.stack(out).float()


def zero_net_diffusion(prediction="v"):
    """A process whose network predicts 0: its loss is then the mean square of the target."""
    return diffusion.GaussianDiffusion(lambda x, t, y=None: torch.zeros_like(x), 100, "cosine", prediction)


def test_stable_targets_are_bayes_rule_over_the_pool_and_keep_x_t():
    d = zero_net_diffusion()
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(6, 1, 3, 3, generator=g) * 2 - 1
    t = torch.tensor([0, 20, 50, 70, 85, 99])
    x0, noise = pool[[0, 1, 2, 0, 3, 5]], torch.randn(6, 1, 3, 3, generator=g)
    xt = d.q_sample(x0, t, noise)
    x0_target, noise_target = diffusion.stable_targets(d, x0, t, noise, pool)
    assert torch.allclose(x0_target, bayes_x0(d, xt, t, pool), atol=1e-5)
    assert torch.allclose(d.q_sample(x0_target, t, noise_target), xt, atol=1e-5)  # the same x_t
    assert torch.allclose(x0_target[0], pool[0], atol=1e-6)  # t = 0: x_t points at its own image
    # near pure noise the weights are almost even: the average image
    assert torch.allclose(x0_target[5], pool.mean(0), atol=0.02)
    # a mask leaves only the allowed images
    allowed = torch.zeros(6, 6, dtype=torch.bool)
    allowed[:, 4:] = True
    masked, _ = diffusion.stable_targets(d, x0, t, noise, pool, allowed)
    assert torch.allclose(masked, bayes_x0(d, xt, t, pool[4:]), atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_stable_target_with_the_whole_data_set_is_the_exact_regression_target(prediction):
    """Xu et al. 2023: with a data set of two images, both in the pool, the target is built
    from the exact E[x0 | x_t]: the same for every noise that gives the same x_t, so it has
    less variance than the usual target, and it agrees with it where x_t fits its own image
    (small t) and in expectation."""
    d = zero_net_diffusion(prediction)
    u, w = x_star((2, 1, 4, 4)).unbind(0)
    n = 2000
    x0 = torch.stack([u, w]).repeat(n // 2, 1, 1, 1)  # half u, half w
    t = torch.full((n,), 80)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    xt = d.q_sample(x0, t, noise)
    a, s = d.sqrt_alphas_cumprod[80], d.sqrt_one_minus_alphas_cumprod[80]

    def target(x0_, eps_):
        return eps_ if prediction == "eps" else a * eps_ - s * x0_

    # the exact E[x0 | x_t] for the two images, each with prior 1/2, and the target it gives
    x0_hat = bayes_x0(d, xt, t, torch.stack([u, w]))
    exact = target(x0_hat, (xt - a * x0_hat) / s)
    pool = torch.stack([u, w])
    x0_target, noise_target = diffusion.stable_targets(d, x0, t, noise, pool)
    stable_loss = torch.stack([d.loss(x0_target[i:i + 1], t=t[i:i + 1], noise=noise_target[i:i + 1])
                               for i in range(0, n, 100)])
    assert torch.allclose(stable_loss, (exact[::100] ** 2).flatten(1).mean(1), rtol=1e-3, atol=1e-6)
    usual = target(x0, noise)
    assert 0.01 < (x0_hat - x0).abs().mean() < 0.5  # t = 80: x_t does not pin down its image
    assert (exact - usual).mean(0).abs().max() < 0.05  # the target moved, by 0 on average
    assert exact.var(0).mean() < usual.var(0).mean()  # ... and is less noisy
    # small t: the target is the usual one
    t5 = torch.full((4,), 5)
    x0_5, noise_5 = diffusion.stable_targets(d, x0[:4], t5, noise[:4], pool)
    assert d.loss(x0_5, t=t5, noise=noise_5).item() == \
        pytest.approx(d.loss(x0[:4], t=t5, noise=noise[:4]).item(), rel=1e-4)


def test_stable_target_of_a_conditional_model_weighs_its_own_class_only(monkeypatch):
    """An x_t labelled y can only have come from an image of class y; with its label dropped
    (classifier-free guidance), from any image (Trainer.stable_targets builds the mask)."""
    import types
    import training
    seen = {}
    monkeypatch.setattr(diffusion, "stable_targets",
                        lambda d, x0, t, noise, pool, allowed=None: seen.update(allowed=allowed))
    trainer = types.SimpleNamespace(module=diffusion, diffusion=None)
    x0, reference = x_star((2, 1, 2, 2)), (x_star((3, 1, 2, 2), seed=1), torch.tensor([1, 0, 1]))
    labels, t = torch.tensor([0, 1]), torch.tensor([50, 50])
    training.Trainer.stable_targets(trainer, x0, labels, labels, t, x0, reference)
    # pool = (x0[0], x0[1], reference...): labels 0, 1, 1, 0, 1
    assert seen["allowed"].tolist() == [[True, False, False, True, False],
                                        [False, True, True, False, True]]
    dropped = torch.full((2,), diffusion.NULL_CLASS)
    training.Trainer.stable_targets(trainer, x0, labels, dropped, t, x0, reference)
    assert seen["allowed"].all()


# -- the MNIST U-Net -------------------------------------------------------------------------------


def test_unet_maps_shape_to_shape_and_depends_on_t_and_y():
    D = diffusion  # the MNIST U-Net; tests/test_cifar.py covers the CIFAR one
    torch.manual_seed(0)
    m = D.DiffusionModel(hidden_dims=(16, 32, 32), time_dim=32, num_classes=10).eval()
    x = torch.randn(2, 1, 28, 28)
    t = torch.tensor([10, 10])
    out = m(x, t, torch.tensor([1, 1]))
    assert out.shape == x.shape
    assert not torch.allclose(out, m(x, torch.tensor([500, 500]), torch.tensor([1, 1])))
    assert not torch.allclose(out, m(x, t, torch.tensor([7, 7])))
    assert not torch.allclose(out, m(x, t, torch.tensor([D.NULL_CLASS] * 2)))
    assert torch.allclose(m(x, t), m(x, t, torch.tensor([D.NULL_CLASS] * 2)))
    # channels_last gives the same answer as the default layout
    m_cl = m.to(memory_format=torch.channels_last)
    out_cl = m_cl(x.contiguous(memory_format=torch.channels_last), t, torch.tensor([1, 1]))
    assert torch.allclose(out, out_cl, atol=1e-5)


def test_unet_other_sizes_and_bad_size():
    D = diffusion  # the MNIST U-Net; tests/test_cifar.py covers the CIFAR one
    m = D.DiffusionModel(image_size=32, channels=3, hidden_dims=(8, 16), time_dim=16)
    assert m(torch.randn(1, 3, 32, 32), torch.tensor([3])).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible"):
        D.DiffusionModel(image_size=30, hidden_dims=(8, 16, 32))


def test_self_conditioned_unet_sees_its_estimate_as_extra_channels():
    import common
    torch.manual_seed(0)
    m = diffusion.DiffusionModel(hidden_dims=(16, 32, 32), time_dim=32, self_cond=True).eval()
    assert m.init_conv.in_channels == 2 and m.config["self_cond"]
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 600])
    estimate = torch.rand(2, 1, 28, 28) * 2 - 1
    assert torch.equal(m(x, t), m(x, t, x0_self=torch.zeros_like(x)))  # None: "no estimate yet"
    assert not torch.allclose(m(x, t), m(x, t, x0_self=estimate))
    # a checkpoint's config picks the process that feeds the estimate
    args = (1000, "cosine", "v")
    assert isinstance(common.make_diffusion(diffusion, m, m.config, *args), diffusion.SelfConditionedDiffusion)
    plain = diffusion.DiffusionModel(hidden_dims=(8, 16))
    assert type(common.make_diffusion(diffusion, plain, plain.config, *args)) is diffusion.GaussianDiffusion


def test_default_model_has_expected_layout():
    D = diffusion  # the MNIST U-Net; tests/test_cifar.py covers the CIFAR one
    m = D.DiffusionModel()
    assert m.config == dict(image_size=28, channels=1, hidden_dims=[16, 32, 64], time_dim=128,
                            num_classes=None, self_cond=False)
    # every GroupNorm normalizes groups of 8 channels: 2 groups at 16 channels, 8 at 64
    assert [m.downs[k].res.norm2.num_groups for k in range(3)] == [2, 4, 8]
    assert m.out[0].num_groups == 2 and m.bottleneck.attn.norm.num_groups == 8
    assert D.DiffusionModel(hidden_dims=(4, 8)).downs[0].res.norm1.num_groups == 1
    # adaptive norm: the time embedding gives a scale and a shift per channel
    assert m.downs[0].res.time_proj[1].out_features == 2 * 16
    assert isinstance(m.bottleneck.attn, D.SelfAttention)
    # rebuildable from its config alone: the same tensors, name by name
    rebuilt = D.DiffusionModel(**m.config).state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_ema_warmup_and_average(D):
    m = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(m.weight)
    ema = D.EMA(m, decay=0.99)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # d = min(0.99, 2/11)
    assert ema.shadow["weight"].item() == pytest.approx(1 - 2 / 11)
    for _ in range(2000):
        ema.update(m)
    assert ema.shadow["weight"].item() == pytest.approx(1.0, abs=1e-6)
    state = ema.state_dict()
    ema2 = D.EMA(torch.nn.Linear(1, 1, bias=False), decay=0.5)
    ema2.load_state_dict(state)
    assert ema2.decay == 0.99 and ema2.num_updates == 2001


@pytest.mark.parametrize("power", [0.0, 2.5, 3.0, 8.0])
def test_ema_warmup_is_a_power_function_average(D, power):
    """Before the cap, the EMA is sum_k W_k w_k over the weights after each update k (k = 0:
    the initial weights), with W_k = (1 - d_k) prod_{j > k} d_j for d_j = (1 + j) / (power + 2
    + j), which telescopes to W_k ~ Gamma(k + power + 2) / Gamma(k + 2), about k^power."""
    m = torch.nn.Linear(1, 1, bias=False)
    ema = D.EMA(m, decay=0.9999999, power=power)
    n = 1000
    for k in range(1, n + 1):
        with torch.no_grad():
            m.weight.fill_(float(k))  # the weights after update k are k, the initial ones 0
        ema.update(m)
    g = power
    lg = math.lgamma
    # closed form of the weights, computed independently of the recursion
    W = [math.exp(lg(n + 2) + lg(g + 3) - lg(2) - lg(n + g + 3))]  # the initial weights
    W += [(g + 1) / (g + 2 + k) * math.exp(lg(n + 2) + lg(k + g + 3) - lg(k + 2) - lg(n + g + 3))
          for k in range(1, n + 1)]
    assert sum(W) == pytest.approx(1.0, rel=1e-9)
    assert ema.shadow["weight"].item() == pytest.approx(sum(k * w for k, w in enumerate(W)), rel=1e-5)
    # the docstring's shares: 1 - (1 - f)^(power + 1) of the weight on the last fraction f
    for f in (0.1, 1 / 3):
        share = sum(W[k] for k in range(n + 1) if k > (1 - f) * n)
        assert share == pytest.approx(1 - (1 - f) ** (g + 1), abs=0.01)
    # saved and restored with its power
    ema2 = D.EMA(m, decay=0.5, power=1.0)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.power == power


def test_training_cuts_the_loss():
    D = diffusion  # the MNIST U-Net; tests/test_cifar.py covers the CIFAR one
    torch.manual_seed(0)
    m = D.DiffusionModel(hidden_dims=(16, 32, 32), time_dim=32)
    d = D.GaussianDiffusion(m, timesteps=100)
    x0 = torch.zeros(8, 1, 28, 28)
    x0[:, :, 8:20, 12:16] = 1.0  # a handful of "ones"
    x0 = x0 * 2 - 1
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    t_fix = torch.arange(8) * 12
    noise_fix = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = d.loss(x0, t=t_fix, noise=noise_fix).item()
    for _ in range(200):
        loss = d.loss(x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = d.loss(x0, t=t_fix, noise=noise_fix).item()
    assert after < 0.3 * before


def test_readme_links_land_on_the_code_they_name():
    """Each [`name`](file.py#L<n>) link in README.md lands on the code it names: line n defines
    `name` (def, class or assignment), or, for a quoted comment or expression, holds it. Each
    RESULTS.md#anchor link lands on a heading of RESULTS.md."""
    from pathlib import Path
    import re
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    links = re.findall(r"\[`([^`]+)`\]\((\w+\.py)#L(\d+)\)", readme)
    assert len(links) >= 15 and {"diffusion.py", "training.py", "optimizers.py"} <= {p for _, p, _ in links}
    for name, path, anchor in links:
        line = (root / path).read_text().splitlines()[int(anchor) - 1].strip()
        if name.isidentifier():
            assert re.match(rf"(def|class) {name}\b|{name} = ", line), (path, anchor, name, line)
        else:
            assert name in line, (path, anchor, name, line)

    def slug(heading):  # GitHub's anchor for a heading
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    anchors = {slug(h) for h in re.findall(r"^#+ (.*)$", (root / "RESULTS.md").read_text(), re.M)}
    for anchor in re.findall(r"\(RESULTS\.md#([^)]+)\)", readme):
        assert anchor in anchors, anchor
