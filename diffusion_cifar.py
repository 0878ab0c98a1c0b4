"""The CIFAR-10 diffusion model: a deeper U-Net and its DDPM/DDIM process, in one file.

Read it next to two papers:
  DDPM: Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239
  DDIM: Song, Meng, Ermon 2020, "Denoising Diffusion Implicit Models", arXiv:2010.02502
and, for the cosine schedule, Nichol & Dhariwal 2021, arXiv:2102.09672; for the
second-order sampler, Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095.

It has the same public names, section order and process API as diffusion.py (the MNIST
model), whose docstring derives the math; only the U-Net differs, and the MNIST module's
section 7 (self-conditioning, stable targets: MNIST's fast recipe) has no twin here.
PRESETS["ddpm"] is the DDPM paper's CIFAR-10 network (Appendix B: 35.7M parameters). tests/test_cifar.py keeps the shared math identical.

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
DPM-Solver++ samplers).
"""

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
    """Sinusoidal embedding of t (dim features) followed by a two-layer MLP to out_dim.

    The DDPM network embeds with dim = base channels and widens to out_dim = 4 x base.
    """

    def __init__(self, dim, out_dim=None):
        super().__init__()
        self.dim = dim
        out_dim = out_dim or dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t):
        return self.mlp(sinusoidal_embedding(t, self.dim))


# ----------------------------------------------------------------------------------------
# 2. U-Net blocks


def group_norm(channels):
    # 32 groups as in the DDPM network; fewer when a narrow preset has fewer channels
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the time embedding added in between and
    dropout before the second conv (DDPM Appendix B)."""

    def __init__(self, in_ch, out_ch, time_dim, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_ch))
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(emb)[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.
    The DDPM network uses one head."""

    def __init__(self, channels, num_heads=1):
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
    """num_blocks residual blocks (each followed by attention at the chosen resolutions),
    then (unless last) a stride-2 conv. Every block's output is kept as a skip connection."""

    def __init__(self, in_ch, out_ch, time_dim, num_blocks, attn, downsample, dropout=0.0):
        super().__init__()
        self.res = nn.ModuleList(ResidualBlock(in_ch if i == 0 else out_ch, out_ch, time_dim, dropout)
                                 for i in range(num_blocks))
        self.attn = nn.ModuleList((SelfAttention(out_ch) if attn else nn.Identity())
                                  for _ in range(num_blocks))
        self.down = nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1) if downsample else None

    def forward(self, x, emb):
        skips = []
        for res, attn in zip(self.res, self.attn):
            x = attn(res(x, emb))
            skips.append(x)
        if self.down is not None:
            x = self.down(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """num_blocks + 1 residual blocks, each eating one skip connection (concatenated), with
    attention at the chosen resolutions, then (unless last) nearest upsampling and a conv."""

    def __init__(self, in_ch, skip_chs, out_ch, time_dim, attn, upsample, dropout=0.0):
        super().__init__()
        ins = [in_ch] + [out_ch] * (len(skip_chs) - 1)
        self.res = nn.ModuleList(ResidualBlock(i + s, out_ch, time_dim, dropout)
                                 for i, s in zip(ins, skip_chs))
        self.attn = nn.ModuleList((SelfAttention(out_ch) if attn else nn.Identity())
                                  for _ in skip_chs)
        self.up = nn.Conv2d(out_ch, out_ch, 3, padding=1) if upsample else None

    def forward(self, x, skips, emb):
        for res, attn in zip(self.res, self.attn):
            x = attn(res(torch.cat([x, skips.pop()], dim=1), emb))
        if self.up is not None:
            x = self.up(F.interpolate(x, scale_factor=2, mode="nearest"))
        return x


class BottleneckBlock(nn.Module):
    """Residual block, self-attention, residual block, at the lowest resolution."""

    def __init__(self, channels, time_dim, dropout=0.0):
        super().__init__()
        self.res1 = ResidualBlock(channels, channels, time_dim, dropout)
        self.attn = SelfAttention(channels)
        self.res2 = ResidualBlock(channels, channels, time_dim, dropout)

    def forward(self, x, emb):
        return self.res2(self.attn(self.res1(x, emb)), emb)


# ----------------------------------------------------------------------------------------
# 3. The U-Net


class DiffusionModel(nn.Module):
    """U-Net eps_theta(x_t, t[, y]) in the layout of the DDPM CIFAR-10 network.

    Level k works at image_size / 2^k with base_channels * channel_mult[k] channels and
    num_res_blocks residual blocks (num_res_blocks + 1 on the way up); attention sits at the
    resolutions in attn_resolutions. The time embedding is 4 x base_channels wide.
    With num_classes set, a learned class embedding (plus one null class) is added to it.
    """

    def __init__(self, image_size=32, channels=3, base_channels=64, channel_mult=(1, 2, 2),
                 num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, num_classes=None):
        super().__init__()
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} must be divisible by {2 ** (levels - 1)} "
                             f"for {levels} U-Net levels")
        self.config = dict(image_size=image_size, channels=channels, base_channels=base_channels,
                           channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), dropout=dropout,
                           num_classes=num_classes)
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        time_dim = 4 * base_channels

        self.time_embed = TimeEmbedding(base_channels, time_dim)
        # num_classes real classes + 1 null class at index num_classes
        self.class_embed = nn.Embedding(num_classes + 1, time_dim) if num_classes else None

        self.init_conv = nn.Conv2d(channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mult]
        self.downs = nn.ModuleList()
        ch, res = base_channels, image_size
        for k, w in enumerate(widths):
            last = k == levels - 1
            self.downs.append(DownBlock(ch, w, time_dim, num_res_blocks, res in attn_resolutions,
                                        downsample=not last, dropout=dropout))
            ch, res = w, res if last else res // 2
        self.bottleneck = BottleneckBlock(ch, time_dim, dropout)
        # Up level k pops num_res_blocks skips of its own width, then one of the level below
        # it (the downsampled output of level k-1, or the init_conv output at level 0).
        self.ups = nn.ModuleList()
        for k in reversed(range(levels)):
            skip_chs = [widths[k]] * num_res_blocks + [widths[k - 1] if k > 0 else base_channels]
            self.ups.append(UpBlock(ch, skip_chs, widths[k], time_dim, res in attn_resolutions,
                                    upsample=k > 0, dropout=dropout))
            ch, res = widths[k], res * 2 if k > 0 else res
        self.out = nn.Sequential(group_norm(base_channels), nn.SiLU(),
                                 nn.Conv2d(base_channels, channels, 3, padding=1))

    def forward(self, x, t, y=None):
        emb = self.time_embed(t)  # (B, time_dim)
        if self.class_embed is not None:
            if y is None:
                y = torch.full_like(t, NULL_CLASS)
            y = torch.where(y < 0, self.num_classes, y)  # -1 -> the null class row
            emb = emb + self.class_embed(y)
        h = self.init_conv(x)
        skips = [h]
        for down in self.downs:
            h, level_skips = down(h, emb)
            skips.extend(level_skips)
        h = self.bottleneck(h, emb)
        for up in self.ups:
            h = up(h, skips, emb)  # pops num_res_blocks + 1 skips, last in first out
        return self.out(h)


PRESETS = {
    # the DDPM paper's CIFAR-10 network (Appendix B): 35.7M parameters
    "ddpm": dict(image_size=32, channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
    # the same layout at half width and three levels
    "small": dict(image_size=32, channels=3, base_channels=64, channel_mult=(1, 2, 2),
                  num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
    # the CPU recipe's network (train_diffusion_cifar.py --recipe cpu): four levels down to
    # 4x4, one block per level, attention only at 8x8 and 4x4, no dropout (an hour of training
    # sees each image about five times, too few to overfit)
    "cpu": dict(image_size=32, channels=3, base_channels=32, channel_mult=(1, 2, 2, 2),
                num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
    # for quick experiments on a CPU
    "tiny": dict(image_size=32, channels=3, base_channels=32, channel_mult=(1, 2, 2),
                 num_res_blocks=1, attn_resolutions=(16,), dropout=0.1),
}


def describe(model):
    """Print the U-Net level by level: what each block outputs for one image, and its size.
    `python diffusion.py` prints the default network this way."""
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
    _sample_loop, runs from pure noise down to the image.
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


if __name__ == "__main__":
    describe(DiffusionModel(**PRESETS["cpu"]))  # the default recipe's network
