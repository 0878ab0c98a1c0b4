"""The MNIST diffusion model: a small U-Net and its DDPM/DDIM process, in one file.

Read it next to two papers:
  DDPM: Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239
  DDIM: Song, Meng, Ermon 2020, "Denoising Diffusion Implicit Models", arXiv:2010.02502
and, for the cosine schedule, Nichol & Dhariwal 2021, arXiv:2102.09672; for the
second-order sampler, Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095; for
self-conditioning, Chen, Zhang & Hinton 2022, "Analog Bits", arXiv:2208.04202.

Conventions
- Images live in [-1, 1], shaped (B, C, H, W).
- Timesteps are 0-indexed: code t = paper t - 1. Code t = 0 is the last denoising step
  (paper t = 1), code t = T - 1 the first (paper t = T).
- The network predicts the noise eps that was added (DDPM's "epsilon parameterization"),
  or with prediction="v" the velocity v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho
  2022, "Progressive Distillation", arXiv:2202.00512).
- Class labels are integers in [0, num_classes); the label -1 means "no class" and selects
  the extra null embedding used by classifier-free guidance.

Sections: 1. time embedding, 2. U-Net blocks, 3. U-Net, 4. EMA, 5. schedules,
6. the Gaussian diffusion process (forward, posterior, loss, and the DDPM, DDIM and
DPM-Solver++ samplers), 7. the fast recipe's improvements beside it (self-conditioning,
stable targets). Section 6 is the same in diffusion_cifar.py, number for number.

The derivation, in the code's names (abar_t = alpha-bar_t = prod_{s <= t} (1 - beta_s))
1. Forward process. One step adds a little noise: q(x_t | x_{t-1}) = N(sqrt(1 - beta_t)
   x_{t-1}, beta_t I). Gaussians compose, so T steps collapse into one draw (DDPM Eq. 4):
       x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)        q_sample
   Training never runs the chain: it picks a t and jumps there.
2. Reverse step. Given x0, Bayes' rule on two Gaussians gives q(x_{t-1} | x_t, x0) =
   N(mu~, beta~ I) with (Eq. 6-7)
       mu~ = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t
       beta~ = beta_t (1 - abar_{t-1}) / (1 - abar_t)                        q_posterior
   The model only has to guess x0, or equivalently the noise, since Eq. 4 solved for x0 is
       x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)                     (Eq. 15)
   Sampling (Alg. 2) repeats: predict x0 from x_t, draw x_{t-1} from the posterior.  ddpm_step
3. The bound becomes a regression. The variational bound (Eq. 5) is a sum of KL terms between
   Gaussians of fixed variance, each a squared distance between means; through Eq. 15 each is
   w_t ||eps - eps_theta(x_t, t)||^2. DDPM drops w_t (Eq. 14, L_simple): the target has unit
   variance at every t, one well-scaled regression for all t.                loss
   v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 keeps unit variance too, and gives
   x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v with no division by sqrt(abar_t) (Salimans & Ho).
4. DDIM. The loss only sees the marginals q(x_t | x0), and many processes share them. DDIM
   indexes them by sigma_t (Eq. 12 and 16):
       x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma_t^2) eps_pred + sigma_t z
       sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)  ddim_step
   eta = 1 is DDPM's posterior noise, eta = 0 a deterministic map, which may also skip steps.
5. DDIM with eta = 0 is an Euler step of the probability-flow ODE; DPM-Solver++(2M) solves the
   same ODE to second order at the same number of network calls.             dpm_solver_step
6. Classifier-free guidance. One network learns p(x | y) and p(x) (labels dropped at random,
   drop_labels); sampling uses eps = eps_uncond + w (eps_cond - eps_uncond).   guided_output
"""

import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NULL_CLASS = -1  # label that means "unconditional" (classifier-free guidance)

# ----------------------------------------------------------------------------------------
# 1. Time embedding


def sinusoidal_embedding(t, dim):
    """Transformer-style sinusoidal features of the timestep: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t followed by a two-layer MLP, as in the DDPM U-Net."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(sinusoidal_embedding(t, self.dim))


# ----------------------------------------------------------------------------------------
# 2. U-Net blocks


def group_norm(channels, group_size=8):
    """GroupNorm over groups of `group_size` channels (one group where there are fewer).

    Groups of 8 channels: 2 groups at the 16-channel 28x28 level, 8 at the 64-channel one.
    Narrow groups are slow on a CPU: in the channels_last layout, PyTorch's GroupNorm took 4.4
    ms forward and backward on a batch of 64 x 16 x 28 x 28 in 8 groups of 2 channels, 0.7 ms
    in 2 groups of 8 (2-core AMD EPYC, float32), and a whole training step got 13% faster with
    samples as good after 10 minutes (RESULTS.md).
    """
    return nn.GroupNorm(max(1, channels // group_size), channels)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice; the time embedding scales and shifts the second norm.

    h = GroupNorm(h) * (1 + scale(emb)) + shift(emb), the adaptive group norm of Dhariwal &
    Nichol 2021 (Sec. 3), lets every timestep rescale the features, not only offset them as
    DDPM's added embedding does.
    """

    def __init__(self, in_ch, out_ch, time_dim):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * out_ch))
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time_proj(emb)[:, :, None, None].chunk(2, dim=1)  # each (B, C, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift  # adaptive group norm
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # fused softmax(q k^T / sqrt(d)) v
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class DownBlock(nn.Module):
    """A residual block, then (unless last) a stride-2 conv that halves H and W."""

    def __init__(self, in_ch, out_ch, time_dim, downsample):
        super().__init__()
        self.res = ResidualBlock(in_ch, out_ch, time_dim)
        self.down = nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1) if downsample else None

    def forward(self, x, emb):
        skip = self.res(x, emb)
        return (self.down(skip) if self.down is not None else skip), skip


class UpBlock(nn.Module):
    """Concatenate the skip connection, a residual block, then (unless last) upsample x2.

    The upsampling conv also narrows to the next level's width (up_ch), which keeps the
    full-resolution convs cheap.
    """

    def __init__(self, in_ch, skip_ch, out_ch, time_dim, up_ch=None):
        super().__init__()
        self.res = ResidualBlock(in_ch + skip_ch, out_ch, time_dim)
        self.up = nn.Conv2d(out_ch, up_ch, 3, padding=1) if up_ch else None

    def forward(self, x, skip, emb):
        h = self.res(torch.cat([x, skip], dim=1), emb)
        if self.up is not None:
            h = self.up(F.interpolate(h, scale_factor=2, mode="nearest"))
        return h


class BottleneckBlock(nn.Module):
    """Residual block, self-attention, residual block, at the lowest resolution."""

    def __init__(self, channels, time_dim):
        super().__init__()
        self.res1 = ResidualBlock(channels, channels, time_dim)
        self.attn = SelfAttention(channels)
        self.res2 = ResidualBlock(channels, channels, time_dim)

    def forward(self, x, emb):
        return self.res2(self.attn(self.res1(x, emb)), emb)


# ----------------------------------------------------------------------------------------
# 3. The U-Net


class DiffusionModel(nn.Module):
    """U-Net eps_theta(x_t, t[, y]) for small grayscale images: 28 -> 14 -> 7 and back.

    hidden_dims gives the width at each resolution; there are len(hidden_dims) levels.
    With num_classes set, a learned class embedding (plus one null class) is added to the
    time embedding, which makes the model usable for classifier-free guidance.

    self_cond: the network also sees an estimate of x0, stacked onto x_t as extra input
    channels (self-conditioning, Chen, Zhang & Hinton 2022, "Analog Bits", arXiv:2208.04202,
    Sec. 3): zeros, or its own earlier prediction; SelfConditionedDiffusion decides which.
    """

    def __init__(self, image_size=28, channels=1, hidden_dims=(16, 32, 64), time_dim=128,
                 num_classes=None, self_cond=False):
        super().__init__()
        hidden_dims = tuple(hidden_dims)
        levels = len(hidden_dims)
        if any(h > 8 and h % 8 for h in hidden_dims) or hidden_dims[-1] % 4:
            raise ValueError(f"hidden_dims {list(hidden_dims)} cannot be normalized in groups of 8 "
                             f"channels with 4 attention heads at the bottom: each width must be a "
                             f"multiple of 8 (or at most 8), the last a multiple of 4")
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} must be divisible by {2 ** (levels - 1)} "
                             f"for {levels} U-Net levels")
        self.config = dict(image_size=image_size, channels=channels, hidden_dims=list(hidden_dims),
                           time_dim=time_dim, num_classes=num_classes, self_cond=self_cond)
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.self_cond = self_cond

        self.time_embed = TimeEmbedding(time_dim)
        # num_classes real classes + 1 null class at index num_classes
        self.class_embed = nn.Embedding(num_classes + 1, time_dim) if num_classes else None

        in_channels = 2 * channels if self_cond else channels  # x_t (and the x0 estimate)
        self.init_conv = nn.Conv2d(in_channels, hidden_dims[0], 3, padding=1)
        ins = (hidden_dims[0],) + hidden_dims[:-1]
        self.downs = nn.ModuleList(
            DownBlock(i, o, time_dim, downsample=(k < levels - 1))
            for k, (i, o) in enumerate(zip(ins, hidden_dims)))
        self.bottleneck = BottleneckBlock(hidden_dims[-1], time_dim)
        # up path mirrors the down path; level k receives the skip of down level k and
        # hands hidden_dims[k - 1] channels up to level k - 1
        self.ups = nn.ModuleList(
            UpBlock(hidden_dims[k], hidden_dims[k], hidden_dims[k], time_dim,
                    up_ch=hidden_dims[k - 1] if k > 0 else None)
            for k in reversed(range(levels)))
        self.out = nn.Sequential(group_norm(hidden_dims[0]), nn.SiLU(),
                                 nn.Conv2d(hidden_dims[0], channels, 3, padding=1))

    def forward(self, x, t, y=None, x0_self=None):
        """x: x_t (B, C, H, W), t: (B,) timesteps, y: (B,) labels or None; x0_self: the x0
        estimate a self-conditioned network sees (None: zeros, "no estimate yet")."""
        if self.self_cond:
            x = torch.cat([x, torch.zeros_like(x) if x0_self is None else x0_self], dim=1)
        emb = self.time_embed(t)  # (B, time_dim)
        if self.class_embed is not None:
            if y is None:
                y = torch.full_like(t, NULL_CLASS)
            y = torch.where(y < 0, self.num_classes, y)  # -1 -> the null class row
            emb = emb + self.class_embed(y)
        h = self.init_conv(x)
        skips = []
        for down in self.downs:
            h, skip = down(h, emb)
            skips.append(skip)
        h = self.bottleneck(h, emb)
        for up in self.ups:
            h = up(h, skips.pop(), emb)
        return self.out(h)


def describe(model):
    """Print the U-Net level by level: what each block outputs for one image, and its size.
    `python diffusion.py` prints the network train_diffusion.py trains by default this way."""
    rows, handles = [], []

    def record(name, module):
        def hook(mod, inputs, output):
            out = output[0] if isinstance(output, tuple) else output  # down blocks also return skips
            rows.append((name, type(module).__name__, tuple(out.shape[1:]),
                         sum(p.numel() for p in module.parameters())))
        return hook

    for name, child in model.named_children():
        blocks = [(f"{name}[{i}]", m) for i, m in enumerate(child)] if isinstance(child, nn.ModuleList) \
            else [(name, child)]
        handles += [m.register_forward_hook(record(n, m)) for n, m in blocks]
    x = torch.zeros(1, model.channels, model.image_size, model.image_size)
    with torch.no_grad():
        model(x, torch.zeros(1, dtype=torch.long))
    for h in handles:
        h.remove()
    print(f"{'block':<14}{'type':<16}{'output (C, H, W)':<20}{'parameters':>12}")
    for name, kind, shape, n in rows:
        print(f"{name:<14}{kind:<16}{str(shape):<20}{n:>12,}")
    print(f"{'total':<50}{sum(p.numel() for p in model.parameters()):>12,}")


# ----------------------------------------------------------------------------------------
# 4. Exponential moving average of the weights


class EMA:
    """Shadow weights w_ema <- d * w_ema + (1 - d) * w, with a warmed-up decay.

    The decay after n updates is d = min(decay, (1 + n) / (power + 2 + n)). Until it reaches
    `decay`, w_ema is an average of all the weights so far in which the weights after update k
    count (k + 2)(k + 3)...(k + power + 1) times, about k^power: a power-function EMA (Karras
    et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
    arXiv:2312.02696, Sec. 3), so the average stretches with the run and a short run is not
    dominated by the random initial weights. Weights k^power on a run of N updates put a
    share 1 - (1 - f)^(power + 1) on its last fraction f: power 8, the (1 + n) / (10 + n) of
    TensorFlow's EMA, 61% on the last tenth; power 3, 80% on the last third.
    """

    def __init__(self, model, decay=0.9995, power=8.0):
        self.decay, self.power = decay, power
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        self.num_updates += 1
        # power-function warmup (Karras et al. 2024 Sec. 3): weights of update k ~ k^power
        d = min(self.decay, (1 + self.num_updates) / (self.power + 2 + self.num_updates))
        current = model.state_dict()
        floats = [k for k, v in current.items() if v.dtype.is_floating_point]
        # w_ema += (1 - d) (w - w_ema) for all float tensors at once (one fused kernel per group)
        torch._foreach_lerp_([self.shadow[k] for k in floats], [current[k] for k in floats], 1.0 - d)
        for k, v in current.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)

    def state_dict(self):
        return {"decay": self.decay, "power": self.power, "num_updates": self.num_updates,
                "shadow": self.shadow}

    def load_state_dict(self, state):
        missing, unexpected = self.shadow.keys() - state["shadow"].keys(), state["shadow"].keys() - self.shadow.keys()
        if missing or unexpected:  # a partial EMA would silently keep random weights
            raise KeyError(f"EMA weights do not match the model: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
        self.decay, self.num_updates, self.power = state["decay"], state["num_updates"], state["power"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)

    def copy_to(self, model):
        model.load_state_dict(self.shadow)


# ----------------------------------------------------------------------------------------
# 5. Noise schedules (computed in float64)


def linear_beta_schedule(timesteps):
    """DDPM Sec. 4: betas rise linearly from 1e-4 to 0.02 at T = 1000.

    For other T the end points are scaled by 1000 / T, so that the total noise added
    (and alpha-bar at the end) stays about the same; below T = 20 that would pass beta = 1,
    so betas are clipped at 0.999 as in the cosine schedule.
    """
    scale = 1000.0 / timesteps
    return np.clip(np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64), 0, 0.999)


def cosine_alphas_cumprod(timesteps, s=0.008):
    """Nichol & Dhariwal Eq. 17: alpha-bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    Returns T + 1 values for paper t = 0..T (alpha-bar at paper t = 0 is exactly 1).
    """
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]


def cosine_beta_schedule(timesteps, s=0.008):
    """Nichol & Dhariwal Sec. 3.2: beta_t = 1 - alpha-bar_t / alpha-bar_{t-1}, clipped at 0.999."""
    alphas_cumprod = cosine_alphas_cumprod(timesteps, s)
    return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)


PREDICTIONS = ("eps", "v")  # what the network is trained to output
SCHEDULES = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}


# ----------------------------------------------------------------------------------------
# 6. The Gaussian diffusion process


def _extract(a, t, x):
    """Gather a[t] for each batch element and shape it (B, 1, 1, 1) to broadcast against x."""
    return a.gather(0, t).reshape(-1, *([1] * (x.dim() - 1)))


def ddim_timesteps(num_timesteps, steps):
    """The DDIM sub-sequence tau: `steps` evenly spaced timesteps from T-1 down to 0.

    With steps >= 2 it starts at t = T-1 (pure noise) and ends at t = 0; with steps = 1 the
    single step goes from t = T-1 straight to x0.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {num_timesteps}], got {steps}")
    return np.linspace(num_timesteps - 1, 0, steps).round().astype(np.int64).tolist()


def drop_labels(y, p_uncond, generator=None):
    """Classifier-free guidance's training (Ho & Salimans 2022, arXiv:2207.12598, Alg. 1, line
    3): each label becomes the null class with probability p_uncond, so that one network learns
    both the conditional and the unconditional model. y None (no labels): None."""
    if y is None or p_uncond == 0:
        return y
    drop = _rand(y.shape, generator, y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, NULL_CLASS), y)


def _rand(shape, generator, device):
    """U(0, 1) draws on the generator's own device (the global stream without one)."""
    return torch.rand(shape, generator=generator,
                      device=generator.device if generator is not None else device).to(device)


class GaussianDiffusion(nn.Module):
    """DDPM forward process q, its posterior, the training loss, and three samplers.

    `model` is any callable model(x, t) (or model(x, t, y)) that returns a tensor shaped like x:
    the noise eps (prediction="eps", DDPM) or the velocity v = sqrt(abar) eps - sqrt(1 - abar) x0
    (prediction="v", Salimans & Ho 2022, Sec. 4). Every sampler works with either.
    Each sampler is one step (ddpm_step, ddim_step, dpm_solver_step) that a shared loop,
    _sample_loop, runs from pure noise down to the image. Self-conditioning changes only how
    the network is called: SelfConditionedDiffusion, below.
    """

    def __init__(self, model, timesteps=1000, schedule="cosine", prediction="eps"):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose from {sorted(SCHEDULES)}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose from {list(PREDICTIONS)}")
        self.model = model
        self.num_timesteps = int(timesteps)
        self.schedule = schedule
        self.prediction = prediction

        betas = SCHEDULES[schedule](self.num_timesteps)  # float64
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])  # alpha-bar_{t-1}; 1 at t=0
        # the samplers' per-step scalars are computed in float64 from this copy
        self.alphas_cumprod_f64 = alphas_cumprod

        def buffer(name, value):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

        buffer("betas", betas)
        buffer("alphas", alphas)
        buffer("alphas_cumprod", alphas_cumprod)
        buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        # q(x_t | x_0), DDPM Eq. 4
        buffer("sqrt_alphas_cumprod", np.sqrt(alphas_cumprod))
        buffer("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - alphas_cumprod))
        # x0 from eps, DDPM Eq. 15
        buffer("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod))
        buffer("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod - 1))
        # q(x_{t-1} | x_t, x_0), DDPM Eq. 6-7
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffer("posterior_variance", posterior_variance)
        buffer("posterior_mean_coef1", betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        buffer("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod))

    # -- forward process and posterior -----------------------------------------------------

    def q_sample(self, x0, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I).  DDPM Eq. 4."""
        if noise is None:
            noise = torch.randn_like(x0)
        return _extract(self.sqrt_alphas_cumprod, t, x0) * x0 + \
            _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise  # DDPM Eq. 4

    def q_posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0).  DDPM Eq. 6-7."""
        mean = _extract(self.posterior_mean_coef1, t, xt) * x0 + \
            _extract(self.posterior_mean_coef2, t, xt) * xt  # DDPM Eq. 7, mu-tilde
        return mean, _extract(self.posterior_variance, t, xt)  # DDPM Eq. 7, beta-tilde

    def predict_x0_from_eps(self, xt, t, eps):
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).  DDPM Eq. 15 (DDIM Eq. 9)."""
        return _extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - \
            _extract(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def predict_eps_from_x0(self, xt, t, x0):
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), Eq. 4 solved for the noise."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / \
            _extract(self.sqrt_recipm1_alphas_cumprod, t, xt)

    def velocity(self, x0, t, noise):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.  Salimans & Ho 2022, Sec. 4."""
        return _extract(self.sqrt_alphas_cumprod, t, x0) * noise - \
            _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def x0_and_eps_from_v(self, xt, t, v):
        """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v and eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v.

        Unlike x0 from eps (Eq. 15), nothing is divided by sqrt(abar_t), which is about 5e-5 at
        the last step of the cosine schedule: x0 stays well-defined in pure noise."""
        a = _extract(self.sqrt_alphas_cumprod, t, xt)  # sqrt(abar_t)
        s = _extract(self.sqrt_one_minus_alphas_cumprod, t, xt)  # sqrt(1 - abar_t)
        return a * xt - s * v, s * xt + a * v

    def x0_and_eps(self, xt, t, out):
        """The network's output `out` at (x_t, t) as the pair (x0, eps), for either prediction."""
        if self.prediction == "eps":
            return self.predict_x0_from_eps(xt, t, out), out  # DDPM Eq. 15
        return self.x0_and_eps_from_v(xt, t, out)

    # -- training: DDPM Algorithm 1 ------------------------------------------------------

    def loss(self, x0, y=None, t=None, noise=None):
        """L_simple = E_{t, x0, eps} ||eps - eps_theta(x_t, t)||^2.  DDPM Alg. 1, Eq. 14.

        t is uniform over all T steps and eps ~ N(0, I), unless the caller passes them (the
        training loop may draw t with another density; a validation loss fixes both).
        With prediction="v" the target is v instead of eps: in terms of x0 the loss weight is
        then SNR + 1 rather than SNR (Salimans & Ho 2022, Sec. 4), so the almost pure-noise
        steps, where the rough shape of the image is decided, are no longer weighted by nearly
        zero. This is also EDM's preconditioning and loss weight (Karras et al. 2022,
        arXiv:2206.00364, Table 1) with sigma_data = 1: its network input c_in (x0 + sigma eps)
        is x_t, its target F is -v, and its weight is 1.
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (len(x0),), device=x0.device)  # Alg. 1, line 3
        if noise is None:
            noise = torch.randn_like(x0)  # Alg. 1, line 4
        xt = self.q_sample(x0, t, noise)  # DDPM Eq. 4: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        target = noise if self.prediction == "eps" else self.velocity(x0, t, noise)
        return F.mse_loss(self.network(xt, t, y), target)  # Alg. 1, line 5: descend on this

    # -- what every sampler asks the network -------------------------------------------------

    def network(self, xt, t, y=None):
        """One call of the network at (x_t, t[, y]); t holds a timestep per image."""
        return self.model(xt, t) if y is None else self.model(xt, t, y)

    def guided_output(self, xt, t, y=None, guidance=1.0):
        """The network output at (x_t, t), with classifier-free guidance when y is given and
        guidance != 1.

        Guided: eps = eps_uncond + w (eps_cond - eps_uncond), both halves in one network call
        (for v the same: v is affine in eps at fixed x_t). This w is 1 + w of Ho & Salimans
        2022, Eq. 6: w = 1 is the plain conditional model.
        """
        tt = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        if y is None or guidance == 1.0:
            return self.network(xt, tt, y)
        eps_cond, eps_uncond = self.network(
            torch.cat([xt, xt]), torch.cat([tt, tt]),
            torch.cat([y, torch.full_like(y, NULL_CLASS)])).chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)  # classifier-free guidance

    def predict_x0_and_eps(self, xt, t, y=None, guidance=1.0, clip_x0=False):
        """The denoiser: predicted x0 and eps at (x_t, t), from one network call.

        t is one integer timestep for the whole batch. Clipping x0 to [-1, 1] re-derives eps
        from the clipped x0, so that the pair stays consistent with x_t (Eq. 4).
        """
        out = self.guided_output(xt, t, y, guidance)
        tt = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        x0_pred, eps = self.x0_and_eps(xt, tt, out)
        if clip_x0:
            x0_pred = x0_pred.clamp(-1, 1)
            eps = self.predict_eps_from_x0(xt, tt, x0_pred)
        return x0_pred, eps

    # -- the loop every sampler shares ------------------------------------------------------

    @staticmethod
    def _randn(shape, generator, device):
        """N(0, I) noise drawn on the generator's own device, so a seed means the same noise
        whatever device samples."""
        gen_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_device).to(device)

    def _sample_loop(self, shape, seq, step, generator, noise, return_trajectory, progress, desc):
        """Start from x_T ~ N(0, I) (or the given noise) and apply `step` at each timestep of
        `seq`, which descends to t = 0. step(x, i) -> (x at the next timestep, predicted x0).

        Returns images in [-1, 1], and with return_trajectory also a dict of the timesteps, the
        x_t each step started from, and the predicted x0 at each step (on the CPU).
        """
        device = self.betas.device
        x = noise.to(device) if noise is not None else self._randn(shape, generator, device)
        traj = {"t": [], "xt": [], "x0_pred": []}
        steps = range(len(seq))
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=desc, leave=False)
        for i in steps:
            x_next, x0_pred = step(x, i)
            if return_trajectory:
                traj["t"].append(seq[i])
                traj["xt"].append(x.cpu())
                traj["x0_pred"].append(x0_pred.cpu())
            x = x_next
        x = x.clamp(-1, 1)
        if not return_trajectory:
            return x
        return x, {"t": traj["t"], "xt": torch.stack(traj["xt"]), "x0_pred": torch.stack(traj["x0_pred"])}

    # -- DDPM: Algorithm 2 -----------------------------------------------------------------

    def ddpm_step(self, xt, t, y=None, guidance=1.0, clip_x0=True, variance="posterior", generator=None):
        """One ancestral step x_t -> x_{t-1} (DDPM Alg. 2, lines 3-4). Returns (x_{t-1}, x0_pred).

        Alg. 2 writes the mean as 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps); with x0
        from Eq. 15 that is exactly the posterior mean mu-tilde(x_t, x0) of Eq. 7 (DDPM Eq. 11;
        checked in tests). The Eq. 7 form lets x0 be clipped to [-1, 1] first, as the DDPM code
        does. sigma_t^2 is beta-tilde_t (variance="posterior") or beta_t ("beta"), Sec. 3.2.
        """
        x0_pred, _ = self.predict_x0_and_eps(xt, t, y, guidance, clip_x0)  # eps_theta, Eq. 15
        tt = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        mean, posterior_var = self.q_posterior(x0_pred, xt, tt)  # DDPM Eq. 7 (= Eq. 11)
        if t == 0:
            return mean, x0_pred  # DDPM Alg. 2: no noise at the last step
        var = posterior_var if variance == "posterior" else _extract(self.betas, tt, xt)
        z = self._randn(xt.shape, generator, xt.device)  # Alg. 2, line 3: z ~ N(0, I)
        return mean + var.sqrt() * z, x0_pred  # Alg. 2, line 4

    @torch.no_grad()
    def ddpm_sample(self, shape, y=None, guidance=1.0, generator=None, clip_x0=True,
                    variance="posterior", noise=None, return_trajectory=False, progress=False):
        """Ancestral sampling, DDPM Alg. 2: T network calls, from t = T-1 down to t = 0."""
        if variance not in ("posterior", "beta"):
            raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
        seq = list(range(self.num_timesteps - 1, -1, -1))

        def step(x, i):
            return self.ddpm_step(x, seq[i], y, guidance, clip_x0, variance, generator)

        return self._sample_loop(shape, seq, step, generator, noise, return_trajectory, progress, "DDPM")

    # -- DDIM ------------------------------------------------------------------------------

    def ddim_sigma(self, alpha_bar_t, alpha_bar_prev, eta):
        """sigma_t(eta) = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev).  DDIM Eq. 16."""
        return eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * \
            math.sqrt(1 - alpha_bar_t / alpha_bar_prev)

    def _alpha_bar(self, t):
        """alpha-bar at code timestep t in float64; t = -1 means x0 itself, where it is 1."""
        return float(self.alphas_cumprod_f64[t]) if t >= 0 else 1.0

    def ddim_step(self, xt, t, t_prev, eta=0.0, y=None, guidance=1.0, clip_x0=True, generator=None):
        """One DDIM step from timestep t to the earlier t_prev (t_prev = -1: to x0).  DDIM Eq. 12.

        x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z.
        Returns (x_prev, x0_pred).
        """
        alpha_bar_t, alpha_bar_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        x0_pred, eps = self.predict_x0_and_eps(xt, t, y, guidance, clip_x0)  # "predicted x0", Eq. 9
        sigma_t = self.ddim_sigma(alpha_bar_t, alpha_bar_prev, eta)  # DDIM Eq. 16
        dir_xt = math.sqrt(max(1 - alpha_bar_prev - sigma_t ** 2, 0.0)) * eps  # "direction pointing to x_t"
        x_prev = math.sqrt(alpha_bar_prev) * x0_pred + dir_xt  # DDIM Eq. 12
        if sigma_t > 0:
            x_prev = x_prev + sigma_t * self._randn(xt.shape, generator, xt.device)  # DDIM Eq. 12, random noise
        return x_prev, x0_pred

    @torch.no_grad()
    def ddim_sample(self, shape, steps=50, eta=0.0, y=None, guidance=1.0, generator=None,
                    clip_x0=True, noise=None, return_trajectory=False, progress=False,
                    spacing="uniform"):
        """DDIM sampling over `steps` timesteps (ddim_timesteps, logsnr_timesteps with
        spacing="logsnr", or a distilled student's own grid with spacing="distilled"), one
        ddim_step each: exactly `steps` network calls.

        eta = 0 is deterministic, and is the Euler method for the probability-flow ODE (DDIM
        Sec. 4.3, Eq. 13-14); eta = 1 over all T steps is DDPM. Returns images in [-1, 1].
        """
        seq = SPACINGS[spacing](self.alphas_cumprod_f64, steps)

        def step(x, i):
            t_prev = seq[i + 1] if i + 1 < len(seq) else -1  # -1: the last step lands on x0
            return self.ddim_step(x, seq[i], t_prev, eta, y, guidance, clip_x0, generator)

        return self._sample_loop(shape, seq, step, generator, noise, return_trajectory, progress,
                                 f"DDIM {steps}")

    @torch.no_grad()
    def ddim_invert(self, x0, steps=50, y=None, guidance=1.0, progress=False):
        """Deterministic DDIM encoding x0 -> x_T: Eq. 12 with eta = 0 run backwards (DDIM Sec. 4.3,
        the Euler step of the ODE, Eq. 13).

        It visits the DDIM sub-sequence in reverse, evaluating eps at the step's target
        timestep, so that ddim_sample(..., noise=x_T, steps, clip_x0=False) retraces it.
        Makes exactly `steps` network calls.
        """
        seq = ddim_timesteps(self.num_timesteps, steps)[::-1]  # ascending: 0 ... T-1
        if progress:
            from tqdm.auto import tqdm
            seq = tqdm(seq, desc="DDIM inversion", leave=False)
        x = x0
        alpha_bar_prev = 1.0  # x0 is the "timestep before" the first one
        for t in seq:
            alpha_bar_t = self._alpha_bar(t)
            _, eps = self.predict_x0_and_eps(x, t, y, guidance, clip_x0=False)
            x0_pred = (x - math.sqrt(1 - alpha_bar_prev) * eps) / math.sqrt(alpha_bar_prev)
            x = math.sqrt(alpha_bar_t) * x0_pred + math.sqrt(1 - alpha_bar_t) * eps  # Eq. 12, eta = 0
            alpha_bar_prev = alpha_bar_t
        return x

    # -- DPM-Solver++(2M) -------------------------------------------------------------------

    def dpm_solver_step(self, xt, t, t_prev, y=None, guidance=1.0, clip_x0=True, previous=None):
        """One DPM-Solver++(2M) step from timestep t to the earlier t_prev (-1: to x0).
        Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095, Alg. 2.

        With alpha = sqrt(abar), sigma = sqrt(1 - abar) and lambda = log(alpha / sigma), the
        probability-flow ODE in x0-prediction form has the exact solution
            x_prev = (sigma_prev / sigma_t) x_t + sigma_prev * integral of e^lambda x0(lambda)
        over [lambda_t, lambda_prev]. Holding x0 constant over the step gives the first-order
        update, which is DDIM with eta = 0. The second order instead extrapolates x0 linearly in
        lambda through the previous step's prediction, `previous` = (t of that step, its x0_pred):
        no extra network call, so `steps` steps still cost `steps` calls.
        Returns (x_prev, x0_pred).
        """
        alpha_bar_t, alpha_bar_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        alpha_t, sigma_t = math.sqrt(alpha_bar_t), math.sqrt(1 - alpha_bar_t)
        alpha_prev, sigma_prev = math.sqrt(alpha_bar_prev), math.sqrt(1 - alpha_bar_prev)
        x0_pred, _ = self.predict_x0_and_eps(xt, t, y, guidance, clip_x0)
        # e^{-h} with h = lambda_prev - lambda_t, the step in log-SNR; 0 when landing on x0
        exp_neg_h = (alpha_t * sigma_prev) / (sigma_t * alpha_prev)
        d = x0_pred  # first order: x0 held constant over the step (Alg. 2, line 4)
        if previous is not None and t_prev >= 0:
            t_last, x0_last = previous
            lam = lambda a: 0.5 * math.log(a / (1 - a))  # lambda from alpha-bar
            h = lam(alpha_bar_prev) - lam(alpha_bar_t)
            r = (lam(alpha_bar_t) - lam(self._alpha_bar(t_last))) / h  # r_i = h_{i-1} / h_i
            d = (1 + 1 / (2 * r)) * x0_pred - 1 / (2 * r) * x0_last  # Alg. 2, line 7: D_i
        # Alg. 2, lines 4 and 8: x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D
        x_prev = (sigma_prev / sigma_t) * xt - alpha_prev * (exp_neg_h - 1) * d
        return x_prev, x0_pred

    @torch.no_grad()
    def dpm_solver_sample(self, shape, steps=20, y=None, guidance=1.0, generator=None,
                          clip_x0=True, noise=None, return_trajectory=False, progress=False,
                          spacing="logsnr"):
        """DPM-Solver++(2M): a second-order multistep solver of the same ODE that DDIM (eta = 0)
        solves to first order. Exactly `steps` network calls, one per dpm_solver_step.

        The first step has no previous prediction and is first order (Alg. 2, line 4). So is the
        last, which lands on x0 (sigma = 0): there h is infinite, r = 0, and the linear
        extrapolation of x0 would be unbounded; the first-order step returns x0_pred, as DDIM
        does. The timesteps are evenly spaced in log-SNR by default (logsnr_timesteps): with
        DDIM's evenly spaced t the second order gains little (RESULTS.md, "Fewer steps").
        Deterministic given the initial noise. Returns images in [-1, 1].
        """
        seq = SPACINGS[spacing](self.alphas_cumprod_f64, steps)
        history = []  # (t, x0_pred) of the step before: the "multistep" memory

        def step(x, i):
            t_prev = seq[i + 1] if i + 1 < len(seq) else -1  # -1: the last step lands on x0
            previous = history[-1] if history else None
            x_prev, x0_pred = self.dpm_solver_step(x, seq[i], t_prev, y, guidance, clip_x0, previous)
            history.append((seq[i], x0_pred))
            return x_prev, x0_pred

        return self._sample_loop(shape, seq, step, generator, noise, return_trajectory, progress,
                                 f"DPM-Solver++ {steps}")


LAMBDA_RANGE = (-3.0, 3.5)  # the log-SNR range that logsnr_timesteps spaces evenly (see there)


def logsnr_timesteps(alphas_cumprod, steps):
    """`steps` timesteps from T-1 down to 0, evenly spaced in lambda = log(alpha / sigma), half
    the log signal-to-noise ratio (the spacing DPM-Solver, Lu et al. 2022, uses for images).

    A solver's error grows with its step h in lambda, not in t, so even steps in lambda spread
    the error evenly. Evenly spaced t do not: the cosine schedule's lambda changes fastest near
    t = 0 and t = T-1, and evenly spaced t take big steps in lambda there.
    The even spacing covers LAMBDA_RANGE, not all of lambda_{T-1} .. lambda_0 (-9.9 .. 5.1 for
    the cosine schedule). Below lambda = -3 the signal is under 5% of the noise and the network
    predicts little more than the mean image, so the first step jumps there from pure noise at
    t = T-1. Above lambda = 3.5 the noise is under 4 grey levels; one step goes from there to
    t = 0. Measured on the 10-minute MNIST model (RESULTS.md, "Fewer steps"), 10 steps: FID
    8.4 over [-3, 3.5], 9.4 over [-5.1, 5.1], 14.3 on evenly spaced t.
    Each lambda is rounded to the nearest trained timestep; where two round to the same t the
    later one moves down by one, so the timesteps stay distinct.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    T = len(alphas_cumprod)
    if not 1 <= steps <= T:
        raise ValueError(f"sampling steps must be in [1, {T}], got {steps}")
    lam = 0.5 * np.log(alphas_cumprod / (1 - alphas_cumprod))  # falls as t rises
    low, high = max(lam[-1], LAMBDA_RANGE[0]), min(lam[0], LAMBDA_RANGE[1])
    targets = np.linspace(low, high, steps)  # from the noisiest to the cleanest
    seq = np.interp(targets, lam[::-1], np.arange(T)[::-1]).round().astype(np.int64)
    seq[0] = T - 1  # the first step always starts from pure noise
    for i in range(1, steps):  # strictly decreasing ...
        seq[i] = min(seq[i], seq[i - 1] - 1)
    for i in range(steps - 1, -1, -1):  # ... and never below 0, ending at 0
        seq[i] = max(seq[i], steps - 1 - i)
    if steps > 1:
        seq[-1] = 0
    return seq.tolist()


def distilled_timesteps(alphas_cumprod, steps):
    """The step grid of progressive distillation (distill.py; Salimans & Ho 2022, Alg. 2, where
    step i of N goes from t = i/N to (i - 1)/N): timesteps round(T k / N) - 1 for k = N .. 1,
    and the last step lands on x0 (k = 0). Every other timestep of the 2N-step grid is one of
    the N-step grid, so one step of a student covers exactly two of its teacher's."""
    T = len(alphas_cumprod)
    if not 1 <= steps <= T:
        raise ValueError(f"sampling steps must be in [1, {T}], got {steps}")
    return [(2 * T * k + steps) // (2 * steps) - 1 for k in range(steps, 0, -1)]  # round half up


SPACINGS = {"uniform": lambda alphas_cumprod, steps: ddim_timesteps(len(alphas_cumprod), steps),
            "logsnr": logsnr_timesteps, "distilled": distilled_timesteps}


# ----------------------------------------------------------------------------------------
# 7. Improvements beside the plain process, each switched on by the training recipe


class SelfConditionedDiffusion(GaussianDiffusion):
    """GaussianDiffusion for a network that also sees an estimate of x0: self-conditioning
    (Chen, Zhang & Hinton 2022, "Analog Bits", arXiv:2208.04202, Sec. 3, Alg. 1 and 2).

    Only `network` changes; loss and the three samplers are the plain ones above.
    - Training (Alg. 1): with probability p_self_cond the network is first called with no
      estimate (zeros), and its x0 prediction, with no gradient through it, is the estimate the
      trained call sees. Otherwise the trained call sees zeros, as at the first step of a
      sampling chain, where no estimate exists yet. p_self_cond = 1 (the validation loss, and
      one-off predictions outside a chain) always makes the first guess: deterministic.
    - Sampling (Alg. 2): inside a chain (_sample_loop, ddim_invert) each network call sees the
      x0 that the call before it predicted; the first sees zeros.
    The estimate is clipped to the data range [-1, 1]. generator: the random stream of the
    p_self_cond coin (None: torch's global one).
    """

    def __init__(self, model, timesteps=1000, schedule="cosine", prediction="eps",
                 p_self_cond=0.5, generator=None):
        super().__init__(model, timesteps, schedule, prediction)
        self.p_self_cond, self.generator = p_self_cond, generator
        self.in_chain = False
        self.x0_prev = None  # inside a chain: the x0 the last network call predicted

    def network(self, xt, t, y=None):
        if self.in_chain:
            estimate = self.x0_prev
            if estimate is not None and len(estimate) != len(xt):  # guidance doubles the batch
                estimate = estimate.repeat(len(xt) // len(estimate), 1, 1, 1)
        else:
            estimate = None
            if self.p_self_cond >= 1 or (self.p_self_cond > 0 and
                                         _rand((), self.generator, xt.device) < self.p_self_cond):
                with torch.no_grad():  # Alg. 1: the first guess, x0 from a call with zeros
                    estimate, _ = self.x0_and_eps(xt, t, self._call(xt, t, y, None))
        return self._call(xt, t, y, estimate)

    def _call(self, xt, t, y, estimate):
        inputs = (xt, t) if y is None else (xt, t, y)
        return self.model(*inputs, x0_self=None if estimate is None else estimate.clamp(-1, 1))

    def predict_x0_and_eps(self, *args, **kwargs):
        x0_pred, eps = super().predict_x0_and_eps(*args, **kwargs)
        if self.in_chain:
            self.x0_prev = x0_pred  # what the next step's network sees (Alg. 2)
        return x0_pred, eps

    @contextlib.contextmanager
    def chain(self):
        """A sampling chain: it starts with no estimate, and forgets its last one at the end.
        A script that runs its own loop of sampler steps (inpaint.py) runs it inside one."""
        self.in_chain, self.x0_prev = True, None
        try:
            yield
        finally:
            self.in_chain, self.x0_prev = False, None

    def _sample_loop(self, *args, **kwargs):
        with self.chain():
            return super()._sample_loop(*args, **kwargs)

    def ddim_invert(self, *args, **kwargs):
        """As GaussianDiffusion.ddim_invert; each call sees the x0 predicted one step lower.
        Sampling feeds it the one from a step higher, so here the retrace is close, not exact."""
        with self.chain():
            return super().ddim_invert(*args, **kwargs)


def posterior_weights(diffusion, xt, t, pool, allowed=None):
    """w_i = q(x0_i | x_t): how likely each pool image is the source of x_t, (B, R).

    pool (R, C, H, W) holds clean images; Bayes' rule with a uniform prior over them and
    q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (Eq. 4) gives
        log w_i = -||x_t - sqrt(abar_t) x0_i||^2 / (2 (1 - abar_t)) + c
                = (sqrt(abar_t) <x_t, x0_i> - abar_t ||x0_i||^2 / 2) / (1 - abar_t) + c',
    a softmax over i of one matrix product (c' holds ||x_t||^2, the same for every i). allowed
    (B, R), optional: False where pool image i cannot be the source of x_t (another class).
    """
    a = _extract(diffusion.sqrt_alphas_cumprod, t, xt).flatten(1)  # (B, 1)
    s = _extract(diffusion.sqrt_one_minus_alphas_cumprod, t, xt).flatten(1)
    with torch.autocast(xt.device.type, enabled=False):  # logits up to ~1e5: float32
        x, r = xt.flatten(1).float(), pool.flatten(1).float()
        logits = (a * (x @ r.T) - 0.5 * a ** 2 * (r * r).sum(1)) / s ** 2
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -math.inf)
        return logits.softmax(1)


def stable_targets(diffusion, x0, t, noise, pool, allowed=None):
    """Stable targets (Xu, Tong & Jaakkola 2023, "Stable Target Field", arXiv:2302.00670).

    The plain loss regresses on the target made from the one image x0 that x_t came from. But
    near pure noise x_t could have come from almost any image, so that target is mostly noise,
    and the network must average it out over many steps. Here x0 is replaced by its posterior
    mean over a pool of clean images (the batch's own and references drawn from the data set):
        x0_target = E[x0 | x_t] = sum_i w_i x0_i           (w: posterior_weights)
    and the noise by the one that makes the same x_t from it (Eq. 4 solved for eps):
        noise_target = (x_t - a x0_target) / s = noise + a / s (x0 - x0_target).
    Feed them to the plain loss in place of (x0, noise): it makes the same x_t and regresses on
    a far less noisy target. The network learns E[target | x_t] either way, the same function up
    to a bias that shrinks as the pool grows. Where x_t fits one image far better than the rest,
    w is (0, ..., 1, ..., 0) and the target is the usual one. Returns (x0_target, noise_target).
    """
    xt = diffusion.q_sample(x0, t, noise)  # DDPM Eq. 4
    with torch.autocast(xt.device.type, enabled=False):
        w = posterior_weights(diffusion, xt, t, pool, allowed)
        x0_target = (w @ pool.flatten(1).float()).view(x0.shape)  # E[x0 | x_t] over the pool
    a = _extract(diffusion.sqrt_alphas_cumprod, t, x0)
    s = _extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0)
    return x0_target, noise + a / s * (x0 - x0_target)


if __name__ == "__main__":
    describe(DiffusionModel(self_cond=True))  # the network train_diffusion.py trains by default
