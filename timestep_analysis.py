"""How diffusion behaves across timesteps. Example: python timestep_analysis.py --checkpoint runs/mnist/best.pt

Always (only data needed; seconds):
  forward_process.png  one image at t = 0, 50, 100, 250, 500, 750, 999, linear vs cosine schedule
  schedules.png        beta_t, alpha-bar_t and log SNR, linear vs cosine
  stable_targets.png   how far stable targets (train_diffusion.py --reference-size) move the
                       v target at each t, and over how many images the weight spreads
With --checkpoint (about a minute on 2 CPU cores for the MNIST model with the defaults):
  loss_per_timestep.png  the loss the model was trained on (v or eps MSE) at each t
  vlb_terms.png          the variational bound (DDPM Eq. 5) term by term, and its sum as NLL
                         in bits/dim (DDPM Table 2 reports 3.70-3.75 on CIFAR-10)
  trajectory.png/.gif    the reverse process: x_t and the predicted x0 every few steps
  ddim_eta.png           DDIM-50 from the same noise with eta = 0, 0.5 and 1
  self_conditioning.png  for a self-conditioned model (the MNIST default): DDIM-50 from the
                         same noise with its own x0 estimate fed back, and with zeros instead;
                         loss_per_timestep.png then also shows the loss without the estimate
  optimizer_steps.png    for one batch, the singular values of the gradient of three of the
                         network's weight matrices and of the step AdamW and Muon
                         (train_diffusion.py --optimizer) would take from it
and analysis.json with the numbers. The bound defaults to an estimate from every 10th term
on 32 images; the exact sum is --vlb-stride 1 (T network calls per batch; --vlb-images 256
for a tight error bar).
"""

import argparse
import copy
import json
import math

import numpy as np
import torch
from tqdm.auto import tqdm

import common
import diffusion as mnist_module
import optimizers

FORWARD_TIMES = [0, 50, 100, 250, 500, 750, 999]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a checkpoint from either training script")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's, else mnist")
    p.add_argument("--data-dir", default="./data", help=common.DATA_DIR_HELP)
    p.add_argument("--index", type=int, default=0, help="test image shown in forward_process.png")
    p.add_argument("--loss-images", type=int, default=256, help="test images for the loss curve")
    p.add_argument("--loss-points", type=int, default=50, help="timesteps on the loss curve")
    p.add_argument("--vlb-images", type=int, default=32, help="test images for the bound")
    p.add_argument("--vlb-stride", type=int, default=10,
                   help="evaluate every k-th KL term and scale by k: an unbiased estimate for "
                        "k > 1, the exact sum for k = 1")
    p.add_argument("--vlb-variance", choices=["posterior", "beta"], default="posterior",
                   help="the reverse-process variance sigma_t^2: beta-tilde_t or beta_t (DDPM Sec. 3.2)")
    p.add_argument("--trajectory-sampler", choices=["ddpm", "ddim"], default="ddpm",
                   help="the sampler of trajectory.png")
    p.add_argument("--trajectory-samples", type=int, default=4, help="samples in trajectory.png")
    p.add_argument("--snapshots", type=int, default=10, help="columns in trajectory.png")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=common.seed_arg, default=0, help="random seed")
    p.add_argument("--out-dir", default="runs/timestep_analysis", help="where the figures and analysis.json go")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# The variational bound, DDPM Eq. 5: L = L_T + sum_{t>1} L_{t-1} + L_0


def gaussian_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def discretized_gaussian_nll(x0, mean, var):
    """-log p(x0 | x1) for 8-bit data in [-1, 1] (DDPM Eq. 13), per element, in nats.

    Each pixel value owns a bin of width 2/255; the outermost bins extend to -inf and +inf.
    """
    std = var.sqrt()
    upper = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), x0 + 1 / 255)
    lower = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), x0 - 1 / 255)
    prob = torch.special.ndtr((upper - mean) / std) - torch.special.ndtr((lower - mean) / std)
    return -torch.log(prob.clamp(min=1e-12))


@torch.no_grad()
def variational_bound(diffusion, x0, variance="posterior", stride=1, clip_x0=True, generator=None,
                      progress=False):
    """The terms of the bound for images x0 (B, C, H, W), on the 8-bit grid in [-1, 1].

    Returns per-image sums in nats: prior L_T, decoder L_0, and kl[t] for code t = 1..T-1
    (L_{t-1} in the paper, paper t = code t + 1), plus the total in bits/dim. Each x_t is one
    draw from q(x_t | x0), as in the usual estimator. sigma_t^2 is beta-tilde_t or beta_t; at
    t = 0, where beta-tilde is 0, the decoder uses beta-tilde_1 (the "clipped" convention).
    """
    d = diffusion
    B = x0.shape[0]
    dims = x0[0].numel()
    T = d.num_timesteps
    device = x0.device

    def flat_sum(v):
        return v.flatten(1).sum(1)

    def randn():
        return torch.randn(x0.shape, generator=generator, device=generator.device if generator else device).to(device)

    def sigma2(t):
        if variance == "beta":
            return d.betas[t]
        return d.posterior_variance[t] if t > 0 else d.posterior_variance[1]

    def model_mean(xt, t):
        x0_pred, _ = d.predict_x0_and_eps(xt, t, None, 1.0, clip_x0)
        tt = torch.full((B,), t, device=device, dtype=torch.long)
        return d.q_posterior(x0_pred, xt, tt)[0]  # mu_theta, DDPM Eq. 7 at the predicted x0

    # L_T = KL(q(x_T | x0) || N(0, I)): no parameters, near 0 for a good schedule
    abar_T = d.alphas_cumprod[T - 1]
    prior = flat_sum(gaussian_kl(abar_T.sqrt() * x0, 1 - abar_T, torch.zeros_like(x0), torch.ones_like(x0)))

    kl = torch.zeros(T, B, device=device)
    ts = list(range(T - 1, 0, -stride))
    # L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)), DDPM Eq. 5
    for t in tqdm(ts, desc="variational bound", disable=not progress):
        tt = torch.full((B,), t, device=device, dtype=torch.long)
        xt = d.q_sample(x0, tt, randn())
        true_mean, true_var = d.q_posterior(x0, xt, tt)
        kl[t] = flat_sum(gaussian_kl(true_mean, true_var, model_mean(xt, t), sigma2(t)))
    kl_sum = kl.sum(0) * stride  # with stride > 1: every k-th term stands for k of them

    # L_0 = -log p_theta(x0 | x1), the discretized Gaussian decoder, DDPM Eq. 13
    x1 = d.q_sample(x0, torch.zeros(B, device=device, dtype=torch.long), randn())
    decoder = flat_sum(discretized_gaussian_nll(x0, model_mean(x1, 0), sigma2(0)))

    total = prior + kl_sum + decoder
    return {"prior": prior, "kl": kl, "decoder": decoder, "total_nats": total,
            "bits_per_dim": total / (dims * math.log(2)), "evaluated_t": ts}


# ----------------------------------------------------------------------------------------
# Figures


def forward_process_figure(x0, T, path, seed):
    plt = common.pyplot()
    times = [t for t in FORWARD_TIMES if t < T] if T >= 1000 else \
        sorted({round(f * (T - 1)) for f in (0, .05, .1, .25, .5, .75, 1)})
    fig, axes = plt.subplots(2, len(times), figsize=(1.3 * len(times) + 1, 3.2), squeeze=False)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    for r, schedule in enumerate(("linear", "cosine")):
        d = mnist_module.GaussianDiffusion(lambda x, t: x, T, schedule)
        for c, t in enumerate(times):
            xt = d.q_sample(x0, torch.tensor([t]), noise)  # DDPM Eq. 4, the same noise for all t
            common.show_image(axes[r][c], xt[0].clamp(-1, 1))
            axes[0][c].set_title(f"t={t}", fontsize=9)
        axes[r][0].set_ylabel(schedule, rotation=0, ha="right", va="center")
    fig.suptitle("Forward process q(x_t | x_0): the cosine schedule destroys information more slowly")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def schedules_figure(T, path):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    t = np.arange(T)
    for schedule in ("linear", "cosine"):
        d = mnist_module.GaussianDiffusion(lambda x, t: x, T, schedule)
        alphas_cumprod = d.alphas_cumprod_f64
        axes[0].plot(t, d.betas.numpy(), label=schedule)
        axes[1].plot(t, alphas_cumprod, label=schedule)
        axes[2].plot(t, np.log(alphas_cumprod / (1 - alphas_cumprod)), label=schedule)  # log SNR
    for ax, title in zip(axes, ("beta_t", "alpha-bar_t", "log SNR = log(alpha-bar / (1 - alpha-bar))")):
        ax.set_title(title)
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def stable_targets(x0, pool, T, points, seed):
    """What stable targets change, at `points` timesteps of the cosine schedule (MNIST's).

    Each x_t is made from an image of x0; the reference set is x0 and pool, as in training
    (the batch and --reference-size other images). Returns the timesteps, the mean square per
    pixel of v_stable - v = (x0 - x0_hat) / sqrt(1 - abar_t) (Eq. 4 and the definition of v),
    and the effective number of images sharing the weight, 1 / sum_i w_i^2 (1: one image).
    """
    d = mnist_module.GaussianDiffusion(None, T, "cosine", "v")
    g = torch.Generator().manual_seed(seed)
    ts = np.linspace(0, T - 1, points).round().astype(int)
    references = torch.cat([x0, pool])
    shifts, spread = [], []
    for t in ts:
        tt = torch.full((len(x0),), int(t))
        xt = d.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        w = mnist_module.posterior_weights(d, xt, tt, references)  # (images, references)
        x0_hat = (w @ references.flatten(1)).view(x0.shape)  # as in diffusion.stable_targets
        shifts.append((((x0 - x0_hat) / d.sqrt_one_minus_alphas_cumprod[t]) ** 2).mean().item())
        spread.append((1 / (w ** 2).sum(1)).mean().item())
    return ts, shifts, spread


def stable_targets_figure(ts, shifts, spread, n_references, path):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(ts, shifts, color="C0")
    ax.set_xlabel("t")
    ax.set_ylabel("mean square of v_stable - v, per pixel", color="C0")
    right = ax.twinx()
    right.plot(ts, spread, color="C1")
    right.set_yscale("log")
    right.set_ylabel("images sharing the weight, 1 / sum w_i^2", color="C1")
    ax.set_title(f"Stable targets over {n_references} reference images (cosine schedule): where x_t\n"
                 f"still shows its own image the target is the usual one", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def loss_per_timestep(diffusion, x0, points, seed, p_self_cond=1.0):
    """The training loss at `points` evenly spaced t, with fixed noise per image: the MSE of
    the quantity the network was trained to predict (eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0).
    A self-conditioned network gets its own first guess of x0 (p_self_cond=1: two calls, as in
    half of its training batches) or zeros (0)."""
    T = diffusion.num_timesteps
    ts = sorted({round(v) for v in np.linspace(0, T - 1, points)})
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)
    if isinstance(diffusion, mnist_module.SelfConditionedDiffusion):
        diffusion = copy.copy(diffusion)  # the same network, this script's own coin
        diffusion.p_self_cond = p_self_cond
    losses = []
    for t in ts:
        tt = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
        losses.append(diffusion.loss(x0, t=tt, noise=noise).item())  # L_simple at t
    return ts, losses


def optimizer_steps(diffusion, x0, seed):
    """The gradient G of one batch's loss for three 3x3 convs of the network (first, middle and
    last of Muon's matrices), as out x (in 3 3) matrices, and the first step each optimizer
    takes from it: AdamW's is sign(G) (m / sqrt(v) with m = (1 - beta1) G and v = (1 - beta2)
    G^2, bias-corrected), Muon's newton_schulz(G). Returns {layer: {step: its singular values,
    largest first, divided by the largest}}."""
    model = diffusion.model
    convs = [p for p in optimizers.muon_param_groups(model)[0]["params"] if p.ndim == 4 and p.shape[-1] == 3]
    names = {id(p): n for n, p in model.named_parameters()}
    torch.manual_seed(seed)  # the self-conditioning coin and the batch's t and noise
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(True)
    with torch.enable_grad():
        diffusion.loss(x0).backward()
    for p, flag in zip(model.parameters(), trainable):
        p.requires_grad_(flag)
    out = {}
    for p in (convs[0], convs[len(convs) // 2], convs[-1]):
        G = p.grad.reshape(len(p), -1).double()  # (out, in 3 3)
        steps = {"gradient G": G, "AdamW's first step: sign(G)": G.sign(),
                 "Muon's step: newton_schulz(G)": optimizers.newton_schulz(G[None])[0]}
        values = {k: torch.linalg.svdvals(M) for k, M in steps.items()}  # largest first
        layer = f"{names[id(p)]} ({G.shape[0]} x {G.shape[1]})"
        out[layer] = {k: (v / v[0]).tolist() for k, v in values.items()}
    model.zero_grad(set_to_none=True)
    return out


def optimizer_steps_figure(steps, path):
    plt = common.pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(steps), figsize=(4.2 * len(steps), 3.6))
    for ax, (layer, values) in zip(axes, steps.items()):
        for label, v in values.items():
            ax.plot(range(1, len(v) + 1), v, label=label)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("singular value, largest first")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("divided by the largest")
    axes[0].legend(fontsize=8)
    fig.suptitle("One batch's gradient and the step each optimizer takes: Muon moves every direction alike",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def line_figure(x, ys, labels, path, xlabel, ylabel, title, logy=True):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for y, label in zip(ys, labels):
        ax.plot(x, y, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if len(ys) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trajectory_figures(traj, snapshots, out_dir):
    """Rows: x_t and predicted x0 for each sample; columns: every few steps, ending at t=0."""
    plt = common.pyplot()
    n_steps = len(traj["t"])
    cols = sorted({round(v) for v in np.linspace(0, n_steps - 1, snapshots)})
    n = traj["xt"].shape[1]
    fig, axes = plt.subplots(2 * n, len(cols), figsize=(1.1 * len(cols) + 1.2, 2.2 * n), squeeze=False)
    for i in range(n):
        for c, k in enumerate(cols):
            common.show_image(axes[2 * i][c], traj["xt"][k, i].clamp(-1, 1))
            common.show_image(axes[2 * i + 1][c], traj["x0_pred"][k, i])
            if i == 0:
                axes[0][c].set_title(f"t={traj['t'][k]}", fontsize=8)
        axes[2 * i][0].set_ylabel("x_t", rotation=0, ha="right", va="center")
        axes[2 * i + 1][0].set_ylabel("pred. x0", rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3)
    fig.savefig(out_dir / "trajectory.png", dpi=100)
    plt.close(fig)
    # GIF: x_t above predicted x0, one frame per snapshot (more frames than the grid)
    from PIL import Image
    frames = []
    for k in sorted({round(v) for v in np.linspace(0, n_steps - 1, min(n_steps, 60))}):
        pair = torch.cat([traj["xt"][k].clamp(-1, 1), traj["x0_pred"][k]], dim=2)  # (n, C, 2H, W)
        row = torch.cat(list(pair), dim=2)  # (C, 2H, n W)
        a = common.to_uint8(row).permute(1, 2, 0).numpy()
        im = Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)
        frames.append(im.resize((im.width * 3, im.height * 3), Image.NEAREST))
    frames += [frames[-1]] * 10  # hold the final image
    frames[0].save(out_dir / "trajectory.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)


@torch.no_grad()
def eta_figure(diffusion, cfg, seed, path, n=8):
    """DDIM-50 from the same x_T with eta = 0, 0.5, 1 (DDIM Eq. 16): eta = 0 is deterministic;
    with eta > 0 fresh noise enters at every step and the images drift away from the eta = 0 ones."""
    shape = (n, cfg["channels"], cfg["image_size"], cfg["image_size"])
    xT = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(diffusion.betas.device)
    steps = min(50, diffusion.num_timesteps)
    rows = [diffusion.ddim_sample(shape, steps=steps, eta=eta, noise=xT,
                                  generator=torch.Generator().manual_seed(seed + 1)).cpu()
            for eta in (0.0, 0.5, 1.0)]
    common.image_rows_figure(rows, ["eta = 0", "eta = 0.5", "eta = 1"], path,
                             f"DDIM-{steps} from the same x_T: eta sets sigma_t (DDIM Eq. 16)")


@torch.no_grad()
def self_conditioning_figure(module, diffusion, cfg, seed, path, n=8):
    """DDIM-50 from the same x_T, twice with the same self-conditioned network: fed the x0 it
    predicted one step earlier (Chen et al. 2022, Alg. 2), and fed zeros at every step, the
    input it trained on for the other half of its batches. Returns both rows."""
    shape = (n, cfg["channels"], cfg["image_size"], cfg["image_size"])
    xT = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(diffusion.betas.device)
    steps = min(50, diffusion.num_timesteps)
    # the plain process calls the network without an estimate: zeros at every step
    blind = module.GaussianDiffusion(diffusion.model, diffusion.num_timesteps, diffusion.schedule,
                                     diffusion.prediction).to(diffusion.betas.device)
    rows = [d.ddim_sample(shape, steps=steps, noise=xT).cpu() for d in (diffusion, blind)]
    common.image_rows_figure(rows, ["own x0 fed back", "zeros instead"], path,
                             f"Self-conditioning: DDIM-{steps} from the same x_T, one network")
    return rows


# ----------------------------------------------------------------------------------------


def main(args):
    device = common.pick_device(args.device)
    for name in ("loss_images", "loss_points", "vlb_images", "vlb_stride", "trajectory_samples", "snapshots"):
        if getattr(args, name) < 1:
            common.fail(f"--{name.replace('_', '-')} must be at least 1")
    out_dir = common.check_writable_dir(args.out_dir)
    ckpt = common.load_checkpoint(args.checkpoint) if args.checkpoint else None
    if ckpt:
        common.refuse_student(ckpt, args.checkpoint, "asks the model at every timestep")
    cfg = ckpt["model_config"] if ckpt else {"image_size": 28, "channels": 1}
    dataset = args.dataset or (ckpt.get("args", {}).get("dataset", "mnist") if ckpt else "mnist")
    split = "test" if dataset in ("mnist", "fashion-mnist", "cifar10") else "train"
    data = common.load_dataset(dataset, args.data_dir, cfg["image_size"], cfg["channels"], split=split)
    if not 0 <= args.index < len(data.images):
        common.fail(f"--index must be in [0, {len(data.images)})")
    T = ckpt["diffusion"]["timesteps"] if ckpt else 1000
    if args.vlb_stride > T:
        common.fail(f"--vlb-stride {args.vlb_stride} is more than the checkpoint's {T} timesteps; "
                    f"the bound needs at least one KL term (use at most {T})")
    for name in ("loss_images", "loss_points", "vlb_images", "trajectory_samples", "snapshots"):
        common.check_range(name, getattr(args, name), 1, common.LIMITS["points"])
    report = {"dataset": dataset, "timesteps": T}

    forward_process_figure(common.to_model_range(data.images[args.index:args.index + 1]), T,
                           out_dir / "forward_process.png", args.seed)
    schedules_figure(T, out_dir / "schedules.png")
    # stable targets: 256 images' x_t, weighed against themselves and up to 2,048 others
    images = common.to_model_range(data.images[:256 + 2048]).float()
    ts, shifts, spread = stable_targets(images[:256], images[256:], T, 50, args.seed)
    stable_targets_figure(ts, shifts, spread, len(images), out_dir / "stable_targets.png")
    report["stable_targets"] = {"t": ts.tolist(), "v_shift_mse": shifts, "images_sharing_weight": spread}
    written = ["forward_process.png", "schedules.png", "stable_targets.png"]

    if ckpt:
        model, diffusion, module = common.model_from_checkpoint(ckpt, device)
        if cfg.get("num_classes"):
            print("note: a conditional model is analysed unconditionally (null class)")
        # loss per timestep
        x0 = common.to_model_range(data.images[:args.loss_images]).to(device)
        ts, losses = loss_per_timestep(diffusion, x0, args.loss_points, args.seed)
        curves, labels = [losses], ["loss"]
        report["loss_per_timestep"] = dict(zip(map(str, ts), losses))
        if isinstance(diffusion, mnist_module.SelfConditionedDiffusion):  # the same loss when the network gets no estimate of x0
            _, blind = loss_per_timestep(diffusion, x0, args.loss_points, args.seed, p_self_cond=0.0)
            curves, labels = [losses, blind], ["with its own first guess of x0", "with zeros instead"]
            report["loss_per_timestep_without_estimate"] = dict(zip(map(str, ts), blind))
        target = "noise eps" if diffusion.prediction == "eps" else "velocity v"
        line_figure(ts, curves, labels, out_dir / "loss_per_timestep.png", "t",
                    f"MSE of the predicted {target}",
                    f"The training loss per timestep ({len(x0)} test images, fixed noise)")

        # the variational bound
        xv = common.to_model_range(data.images[:args.vlb_images]).to(device)
        print(f"variational bound: {T // args.vlb_stride} network calls on {len(xv)} images ...")
        vlb = variational_bound(diffusion, xv, args.vlb_variance, args.vlb_stride,
                                generator=torch.Generator().manual_seed(args.seed), progress=True)
        dims_ln2 = xv[0].numel() * math.log(2)
        kl_bpd = (vlb["kl"].mean(1) / dims_ln2).cpu().numpy()
        evaluated = vlb["evaluated_t"]
        line_figure(evaluated, [kl_bpd[evaluated]], ["L_{t-1}"], out_dir / "vlb_terms.png", "t",
                    "bits/dim", f"Variational bound terms: NLL <= {vlb['bits_per_dim'].mean():.3f} bits/dim "
                    f"(prior {(vlb['prior'].mean() / dims_ln2).item():.2e}, decoder "
                    f"{(vlb['decoder'].mean() / dims_ln2).item():.3f})")
        report["vlb"] = {"bits_per_dim": vlb["bits_per_dim"].mean().item(),
                         # the standard error needs two images at least
                         "bits_per_dim_std_err": ((vlb["bits_per_dim"].std() / math.sqrt(len(xv))).item()
                                                  if len(xv) > 1 else None),
                         "prior_bpd": (vlb["prior"].mean() / dims_ln2).item(),
                         "decoder_bpd": (vlb["decoder"].mean() / dims_ln2).item(),
                         "kl_sum_bpd": float(kl_bpd.sum() * args.vlb_stride),
                         "images": len(xv), "stride": args.vlb_stride, "variance": args.vlb_variance}

        # the reverse trajectory
        shape = (args.trajectory_samples, cfg["channels"], cfg["image_size"], cfg["image_size"])
        g = torch.Generator().manual_seed(args.seed)
        if args.trajectory_sampler == "ddpm":
            _, traj = diffusion.ddpm_sample(shape, generator=g, return_trajectory=True, progress=True)
        else:
            _, traj = diffusion.ddim_sample(shape, steps=min(50, T), generator=g, return_trajectory=True)
        trajectory_figures(traj, args.snapshots, out_dir)
        eta_figure(diffusion, cfg, args.seed, out_dir / "ddim_eta.png")
        written += ["loss_per_timestep.png", "vlb_terms.png", "trajectory.png", "trajectory.gif",
                    "ddim_eta.png"]
        if isinstance(diffusion, mnist_module.SelfConditionedDiffusion):
            self_conditioning_figure(module, diffusion, cfg, args.seed, out_dir / "self_conditioning.png")
            written.append("self_conditioning.png")
        steps = optimizer_steps(diffusion, x0, args.seed)
        optimizer_steps_figure(steps, out_dir / "optimizer_steps.png")
        report["optimizer_steps"] = steps
        written.append("optimizer_steps.png")
        v = report["vlb"]
        spread = f" +- {v['bits_per_dim_std_err']:.3f}" if v["bits_per_dim_std_err"] is not None else ""
        print(f"NLL bound: {v['bits_per_dim']:.3f}{spread} bits/dim "
              f"(prior {v['prior_bpd']:.2e}, KL terms {v['kl_sum_bpd']:.3f}, decoder {v['decoder_bpd']:.3f})")
        hardest = max(report["loss_per_timestep"].items(), key=lambda kv: kv[1])
        print(f"loss per timestep: highest {hardest[1]:.4f} at t={hardest[0]}, "
              f"lowest {min(losses):.4f}")

    (out_dir / "analysis.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {', '.join(written)}, analysis.json in {out_dir}")
    return report


if __name__ == "__main__":
    common.run(main, parse_args)
