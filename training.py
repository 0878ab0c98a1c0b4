"""The training loop both training scripts share: DDPM Algorithm 1 and the bookkeeping around it.

Read Trainer.run first: it is the loop, one page, with a comment on each phase (data,
forward/backward, optimizer and EMA, logging, budgets). Everything around it is a small
named method: learning_rate, validation_loss, sample_grid, save, end_of_epoch. Above the
trainer, the optimizer: Muon for the network's weight matrices, AdamW for the rest (Muon).
The model modules (diffusion.py, diffusion_cifar.py) know nothing of this file.
"""

import copy
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

import common
from common import fail

# Arguments that a resumed run takes from the command line; all others come from the checkpoint.
RESUME_OVERRIDES = {"epochs", "max_steps", "max_minutes", "patience", "min_delta", "device",
                    "out_dir", "resume", "compile", "amp", "data_dir", "overwrite"}
DEFAULT_OUT_DIRS = {"mnist": "runs/mnist", "cifar": "runs/cifar10"}
LOG_EVERY = 25  # steps between points of the smoothed training loss in loss_curve.png
# What a run writes into its --out-dir; --overwrite removes exactly these before a new run.
RUN_FILES = ["last.pt", "best.pt", "metrics.csv", "loss_curve.png", "samples.png", "progress.png"]
RUN_GLOBS = ["samples_epoch*.png", "samples_step*.png", "*.tmp"]


# ----------------------------------------------------------------------------------------
# Arguments


def add_training_args(p, kind):
    """The options both training scripts share. Each script then sets its own defaults, and
    --help shows them as the script will use them (common.HelpFormatter)."""
    a = p.add_argument
    a("--out-dir", default=None,
      help=f"where the run is written (default {DEFAULT_OUT_DIRS[kind]}, or with --resume the "
           f"checkpoint's own folder)")
    a("--overwrite", action="store_true",
      help="replace a run that is already in --out-dir (by default that is refused)")
    a("--data-dir", default="./data", help=common.DATA_DIR_HELP)
    a("--val-size", type=int, default=1000, help="held-out images for the validation loss")
    a("--epochs", type=int, default=100, help="most epochs to train")
    a("--max-steps", type=int, default=None, help="most optimizer steps to train in all")
    a("--max-minutes", type=float, default=None,
      help="wall-clock budget for the whole run, minutes; a resumed run counts its earlier time")
    a("--batch-size", type=int, default=128, help="images per optimizer step")
    a("--lr", type=float, default=2e-4,
      help="peak learning rate (of AdamW, and of Muon with steps of AdamW's size: training.Muon)")
    a("--optimizer", choices=["adamw", "muon"], default="adamw",
      help="adamw, or muon: Muon for the hidden layers' weight matrices, AdamW for the rest "
           "(training.Muon), at the same --lr")
    a("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    a("--warmup", type=int, default=500, help="linear learning-rate warmup, in steps")
    a("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant",
      help="after warmup: constant, or a cosine or linear decay to 0 over --epochs or "
           "--max-minutes, whichever runs out first")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    a("--ema-decay", type=float, default=0.9999,
      help="EMA decay of the weights, reached after a warmup")
    a("--ema-power", type=float, default=8.0,
      help="the EMA's warmup: until --ema-decay is reached, the EMA averages all weights so "
           "far, those of step k weighted about as k^power (diffusion.EMA); 8: the last tenth "
           "of a run counts most, 3: the last third")
    a("--schedule", choices=["linear", "cosine"], default="linear",
      help="the noise schedule beta_t: DDPM's linear one or Nichol & Dhariwal's cosine")
    a("--prediction", choices=["eps", "v"], default="eps",
      help="what the network outputs: the noise eps (DDPM) or the velocity v (Salimans & Ho) "
          )
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--t-power", type=float, default=1.0,
      help="training timesteps t are drawn with density proportional to t^(power - 1): 1 is "
           "DDPM's uniform t, 2 a density rising linearly with t, which trains the noisy steps "
           "more")
    a("--sigma-lognormal", type=float, nargs=2, default=None, metavar=("P_MEAN", "P_STD"),
      help="instead of --t-power: draw noise levels as EDM does, ln sigma ~ N(P_MEAN, P_STD^2) "
           "(Karras et al. 2022 use -1.2 1.2)")
    a("--class-cond", action="store_true", help="train a class-conditional model")
    a("--p-uncond", type=float, default=0.1,
      help="label dropout for classifier-free guidance")
    a("--guidance", type=float, default=2.0,
      help="classifier-free guidance scale for the sample grids")
    a("--eval-share", type=float, default=0.03,
      help="the end-of-epoch work (validation, sample grid, plots, checkpoints) takes at most this "
           "share of the time: where epochs take seconds it runs after several of them; 1: after "
           "every epoch")
    a("--patience", type=int, default=5,
      help="validations without an improvement before stopping (one per epoch, or fewer where "
           "epochs are so short that they would cost more than 3%% of the time)")
    a("--min-delta", type=float, default=1e-4,
      help="smallest validation-loss drop that counts as an improvement")
    a("--sample-steps", type=int, default=50, help="DDIM steps for the sample grids")
    a("--compile", action="store_true", help="torch.compile the network (slow start, faster steps)")
    a("--amp", choices=["auto", "none", "bf16"], default="auto",
      help="bfloat16 autocast for training steps; auto: on where the hardware has fast bf16, "
           "none: float32")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--seed", type=int, default=0, help="random seed")
    a("--resume", default=None, help="continue from this last.pt (or best.pt)")


def check_training_args(args):
    """Impossible arguments get a clear message instead of a failure deep inside torch."""
    common.check_finite(lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                        ema_decay=args.ema_decay, ema_power=args.ema_power, p_uncond=args.p_uncond,
                        guidance=args.guidance, t_power=args.t_power, max_minutes=args.max_minutes,
                        min_delta=args.min_delta, eval_share=args.eval_share)
    for name in ["batch_size", "epochs", "timesteps", "sample_steps"]:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        fail(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        fail(f"--max-minutes must be positive, got {args.max_minutes}")
    if not args.lr > 0:
        fail(f"--lr must be a positive number, got {args.lr}")
    if args.weight_decay < 0 or args.min_delta < 0:
        fail("--weight-decay and --min-delta must be >= 0")
    if not 0 < args.eval_share <= 1:
        fail(f"--eval-share must be in (0, 1], got {args.eval_share}")
    if not 0 <= args.p_uncond < 1:
        fail(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if not 0 <= args.ema_decay < 1:
        fail(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not args.ema_power >= 0:
        fail(f"--ema-power must be >= 0, got {args.ema_power}")
    if args.sample_steps > args.timesteps:
        fail(f"--sample-steps ({args.sample_steps}) cannot exceed --timesteps ({args.timesteps})")
    if not 0 < args.t_power <= 10:
        fail(f"--t-power must be in (0, 10], got {args.t_power}")
    if args.schedule not in ("linear", "cosine") or args.prediction not in ("eps", "v"):
        fail(f"unknown schedule {args.schedule!r} or prediction {args.prediction!r} (a damaged "
             f"checkpoint?); the schedules are linear and cosine, the predictions eps and v")
    lognormal = args.sigma_lognormal
    if lognormal is not None and not (all(map(math.isfinite, lognormal)) and lognormal[1] > 0):
        fail(f"--sigma-lognormal needs a finite P_MEAN and a positive P_STD, got {lognormal}")
    if args.warmup < 0 or args.patience < 1 or args.grad_clip <= 0:
        fail("--warmup must be >= 0, --patience >= 1 and --grad-clip > 0")


def check_out_dir(args):
    """The output folder must be writable now, and a run already in it is never replaced
    silently: only by resuming it, or with --overwrite."""
    out_dir = common.check_writable_dir(args.out_dir)
    existing = [f for f in RUN_FILES[:3] if (out_dir / f).exists()]
    resuming_here = args.resume and Path(args.resume).resolve().parent == out_dir.resolve()
    if existing and not resuming_here and not args.overwrite:
        fail(f"{out_dir} already holds a run ({', '.join(existing)}). Continue it with "
             f"--resume {out_dir / 'last.pt'}, pick another --out-dir, or pass --overwrite "
             f"to replace it.")


def plain(args):
    """argparse.Namespace -> a dict of plain values, storable with weights_only=True."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def prepare_args(args, kind):
    """Check the arguments; with --resume, take the checkpoint's training arguments, keeping
    budgets and placement from the command line. Returns (args, checkpoint or None)."""
    ckpt = None
    if args.resume:
        ckpt = common.load_checkpoint(args.resume, kind)
        for key in ("args", "optimizer", "state", "rng"):
            if not isinstance(ckpt.get(key), (dict, list)):
                fail(f"{args.resume} cannot be resumed: it lacks the training state "
                     f"{key!r} (it can still be sampled from)")
        # options newer than the checkpoint keep their defaults; the process (timesteps,
        # schedule, prediction) is always the one the checkpoint's network was trained with
        merged = {**vars(args), **ckpt["args"], **ckpt["diffusion"]}
        merged.update({k: v for k, v in vars(args).items() if k in RESUME_OVERRIDES})
        args = type(args)(**merged)
    if args.out_dir is None:
        args.out_dir = str(Path(args.resume).parent) if args.resume else DEFAULT_OUT_DIRS[kind]
    check_training_args(args)
    check_out_dir(args)
    return args, ckpt


def note_ignored_architecture(ckpt, given):
    """On --resume the checkpoint's network wins; say so when the command line asked for another."""
    config = ckpt["model_config"]
    differ = {k: v for k, v in given.items() if v is not None and config.get(k) != v}
    if differ:
        kept = ", ".join(f"{k}={config.get(k)}" for k in differ)
        asked = ", ".join(f"{k}={v}" for k, v in differ.items())
        print(f"note: resuming keeps the checkpoint's network ({kept}); ignored {asked} from the "
              f"command line")


def training_timesteps(n, num_timesteps, power, device):
    """n training timesteps drawn with density p(t) about proportional to t^(power - 1).

    power = 1 is DDPM's uniform t. power = 2 samples t in proportion to t: three quarters of
    the batch falls in the noisier half of the process. In expectation this is the uniform-t
    loss weighted by T p(t); the best prediction at each t is unchanged.
    """
    u = torch.rand(n, device=device)
    return (num_timesteps * u ** (1.0 / power)).long().clamp_(max=num_timesteps - 1)


def lognormal_timesteps(n, alphas_cumprod, p_mean, p_std, device):
    """n training timesteps whose noise levels follow EDM's log-normal density (Karras et al.
    2022, arXiv:2206.00364, Table 1, "Training": ln sigma ~ N(P_mean, P_std^2)).

    In DDPM terms sigma = sqrt((1 - abar_t) / abar_t), the noise-to-signal ratio of x_t; each
    drawn sigma goes to the timestep whose sigma is nearest in log scale."""
    log_sigma = 0.5 * torch.log((1 - alphas_cumprod) / alphas_cumprod).float().to(device)  # rises with t
    draw = p_mean + p_std * torch.randn(n, device=device)
    t = torch.searchsorted(log_sigma, draw)
    t = t.clamp(1, len(log_sigma) - 1)
    below_is_nearer = (draw - log_sigma[t - 1]) < (log_sigma[t] - draw)
    return torch.where(below_is_nearer, t - 1, t)


def setup_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, common.pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = common.pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ----------------------------------------------------------------------------------------
# The optimizer: Muon for the hidden layers' weight matrices, AdamW for the rest


def newton_schulz(G, steps=5):
    """About the orthogonal factor U V^T of each matrix G = U S V^T of a batch (B, m, n),
    in a few small matrix products instead of an SVD (the orthogonalization of Muon: Jordan
    et al. 2024, "Muon: An optimizer for hidden layers in neural networks"). A tall batch
    (m > n) is worked on as its transpose, so that X X^T is the smaller square, min(m, n)^2.

    (X X^T) X has the singular vectors of X and its singular values cubed, so the quintic
    X <- a X + b (X X^T) X + c (X X^T)^2 X maps each singular value s to a s + b s^3 + c s^5
    and keeps the vectors. Started from X = G / ||G||_F (every s <= 1), five steps with these
    coefficients take every s >= 0.01 ||G||_F into [0.68, 1.14] (test_newton_schulz_...):
    not exactly 1, and Muon does not need it to be.
    """
    tall = G.shape[-2] > G.shape[-1]
    X = G.mT.contiguous() if tall else G  # (B, m, n), m <= n
    a, b, c = 3.4445, -4.7750, 2.0315
    X = X / (X.norm(dim=(1, 2), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT  # (B, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A, in one call
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X: (a + b A + c A^2) X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon for param groups marked matrix=True, AdamW (as torch.optim.AdamW) for the others.

    Muon (Jordan et al. 2024) treats a weight as the matrix it is; a conv filter bank
    (out, in, k, k) as out x (in k k). With the gradient G and momentum mu = 0.95:
        M <- mu M + G                             momentum
        O <- newton_schulz(G + mu M)              Nesterov; every singular value about 1
        W <- W (1 - lr wd) - lr 0.2 sqrt(max(m, n)) O
    Why: a gradient matrix is dominated by a few directions (a few large singular values), and
    Adam's elementwise step only partly evens that out, so the many weaker directions learn
    slowly (timestep_analysis.py draws both). The orthogonalized step moves every direction
    alike. O's RMS is 1 / sqrt(max(m, n)), so 0.2 sqrt(max(m, n)) O has an RMS of 0.2, about
    that of an AdamW step, and one --lr serves both kinds of parameter (Liu et al. 2025, "Muon
    is Scalable for LLM Training", arXiv:2502.16982, Sec. 2.2). Layers that read the pixels or
    write the output, biases, norms and embeddings stay with AdamW (muon_param_groups).
    """

    def __init__(self, param_groups, lr, weight_decay=0.0, momentum=0.95, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(param_groups, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                            betas=betas, eps=eps, matrix=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self.muon_step if group["matrix"] else self.adamw_step)(group, params)

    def muon_step(self, group, params):
        lr, mu = group["lr"], group["momentum"]
        by_shape = {}  # (m, n) -> [(param, update)]: one batched newton_schulz each
        for p in params:
            M = self.state[p].setdefault("momentum", torch.zeros_like(p))
            M.mul_(mu).add_(p.grad)  # M <- mu M + G
            U = p.grad.add(M, alpha=mu).reshape(len(p), -1)  # Nesterov; (out, in k k)
            by_shape.setdefault(tuple(U.shape), []).append((p, U))
        for (m, n), items in by_shape.items():
            O = newton_schulz(torch.stack([U.float() for _, U in items]))  # (B, m, n)
            scale = 0.2 * max(m, n) ** 0.5  # O's RMS is 1 / sqrt(max(m, n)): the step's is 0.2 lr
            for (p, _), o in zip(items, O):
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                p.add_(o.reshape(p.shape).to(p.dtype), alpha=-lr * scale)  # W <- W - lr scale O

    def adamw_step(self, group, params):
        """torch.optim.AdamW's update, for many small tensors at once (_foreach ops)."""
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if not st:
                st.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            st["step"] += 1
        n = states[0]["step"]
        grads = [p.grad for p in params]
        m, v = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
        torch._foreach_lerp_(m, grads, 1 - beta1)  # m <- beta1 m + (1 - beta1) g
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - beta2)  # v <- beta2 v + (1 - beta2) g^2
        denom = torch._foreach_sqrt(v)  # sqrt(v / (1 - beta2^n)) + eps: bias-corrected
        torch._foreach_div_(denom, math.sqrt(1 - beta2 ** n))
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_addcdiv_(params, m, denom, -lr / (1 - beta1 ** n))


def muon_param_groups(model):
    """Muon's matrices: the weights of every Conv2d and Linear layer except the first conv
    (it reads the pixels) and the last (it writes the output). Everything else (biases, norm
    scales, embedding tables): AdamW."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    matrices = [m.weight for m in layers if m is not convs[0] and m is not convs[-1]]
    chosen = {id(w) for w in matrices}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    return [dict(params=matrices, matrix=True), dict(params=rest, matrix=False)]


def make_optimizer(model, name, lr, weight_decay, device):
    """--optimizer: "muon" (Muon for the weight matrices, AdamW for the rest) or "adamw", the
    fused (single-kernel) AdamW on CUDA and the foreach one elsewhere."""
    if name == "muon":
        return Muon(muon_param_groups(model), lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=device.type == "cuda")


# ----------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Everything one training run holds: model, EMA, optimizer, data, counters, output folder.

    kind: 'mnist' or 'cifar', stored in the checkpoint. augment: optional function applied to
    each float batch x -> x, such as random flips. ckpt: a checkpoint to resume from (see
    prepare_args).
    """

    def __init__(self, args, kind, module, model_config, data, augment=None, ckpt=None):
        self.args, self.kind, self.augment = args, kind, augment
        # stable targets (GaussianDiffusion.loss): an option of train_diffusion.py only
        self.reference_size = getattr(args, "reference_size", 0)
        self.num_classes = data.num_classes
        self.rank, self.world, self.device = setup_distributed(args.device)
        common.configure_backends(self.device)
        self.main_proc = self.rank == 0
        self.out_dir = Path(args.out_dir)

        # -- the model, its process, EMA and optimizer (same initial weights on every rank)
        torch.manual_seed(args.seed)
        self.bf16 = common.use_bf16(args.amp, self.device)
        self.layout = common.memory_format(self.device, self.bf16)
        try:
            self.model = module.DiffusionModel(**model_config).to(self.device, memory_format=self.layout)
        except (TypeError, ValueError) as e:
            fail(f"cannot build the network from model config {model_config}: {e}")
        # checkpoints store the network's own config, defaults included, so that a setting the
        # caller left to its default is not later read as a checkpoint from before it existed
        self.model_config = self.model.config
        self.ema = module.EMA(self.model, args.ema_decay, args.ema_power)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.sampler = module.GaussianDiffusion(self.ema_model, args.timesteps, args.schedule,
                                                args.prediction).to(self.device)
        # a self-conditioned network is validated the same way every time, not at random: always
        # with its own first guess of x0 (two calls)
        self.val_extra = {"p_self_cond": 1.0} if getattr(self.sampler, "self_cond", False) else {}
        self.opt = make_optimizer(self.model, args.optimizer, args.lr, args.weight_decay, self.device)
        self.state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "loss_sum": 0.0, "loss_count": 0,
                      "best_val": math.inf, "bad_epochs": 0}
        self.elapsed_before = 0.0  # seconds of training in earlier sessions of a resumed run
        self.rows = []
        self.progress = {}  # step -> uint8 samples from the same 8 noises: progress.png
        self.train_log = {}  # step -> training loss, smoothed, every LOG_EVERY steps
        self.smoothed_loss = None
        self.stop_requests = []  # filled by the Ctrl-C / SIGTERM handler that train() installs
        if ckpt is not None:
            self.restore(ckpt)
        else:
            torch.manual_seed(args.seed + self.rank)  # a different noise stream on each rank

        train_model = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            train_model = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if args.compile:
            train_model = torch.compile(train_model)
        self.diffusion = module.GaussianDiffusion(train_model, args.timesteps, args.schedule,
                                                  args.prediction).to(self.device)
        self.setup_data(data)
        if self.main_proc and args.overwrite and not args.resume:  # every check has passed
            self.remove_old_run()

    def remove_old_run(self):
        """--overwrite: delete the files an earlier run wrote here, and only those."""
        old = [self.out_dir / f for f in RUN_FILES] + \
            [p for g in RUN_GLOBS for p in self.out_dir.glob(g)]
        for p in old:
            if p.is_file():
                p.unlink()

    def restore(self, ckpt):
        """Load weights, EMA, optimizer, counters and random state from a checkpoint."""
        try:
            self.model.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema"])
            self.opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            fail(f"{self.args.resume} does not fit its own model config, so it cannot be resumed: "
                 f"{str(e).splitlines()[0]}")
        self.state.update(ckpt["state"])
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        self.progress = dict(ckpt.get("progress", {}))
        self.train_log = dict(ckpt.get("train_log", {}))
        self.smoothed_loss = ckpt.get("smoothed_loss")
        rngs = ckpt["rng"]
        if len(rngs) == self.world and isinstance(rngs[self.rank], dict):
            common.set_rng_state(rngs[self.rank])
        else:
            torch.manual_seed(self.args.seed + self.rank + 1000 * self.state["step"])
        metrics = self.out_dir / "metrics.csv"
        self.rows = [r for r in common.read_metrics(metrics) if r["step"] <= self.state["step"]]
        if self.main_proc:
            print(f"resumed from {self.args.resume} at epoch {self.state['epoch']}, step "
                  f"{self.state['step']}, after {self.elapsed_before / 60:.1f} minutes of training")

    def setup_data(self, data):
        """Train/validation split, the epoch sampler, and the fixed validation and sample noise."""
        args = self.args
        self.train_idx, val_idx = common.split_train_val(len(data.images), args.val_size)
        self.labels = data.labels if args.class_cond else None
        if args.class_cond and self.labels is None:
            fail("--class-cond needs labels, and this data set has none (an image folder needs "
                 "one sub-folder per class)")
        if self.labels is not None and not (0 <= int(self.labels.min()) and
                                            int(self.labels.max()) < (self.model_config["num_classes"] or 0)):
            fail(f"--class-cond: the labels run from {int(self.labels.min())} to "
                 f"{int(self.labels.max())}, but the model has {self.model_config['num_classes']} classes")
        # a DistributedSampler deals each epoch's shuffled indices to the ranks
        from torch.utils.data.distributed import DistributedSampler
        self.epoch_sampler = DistributedSampler(range(len(self.train_idx)), num_replicas=self.world,
                                                rank=self.rank, shuffle=True, seed=args.seed, drop_last=True)
        self.batches_per_epoch = len(self.epoch_sampler) // args.batch_size
        if self.batches_per_epoch == 0:
            fail(f"{len(self.train_idx)} training images cannot fill one batch of {args.batch_size} "
                 f"per process; lower --batch-size or --val-size")
        self.total_steps = args.epochs * self.batches_per_epoch
        # the whole data set sits on the GPU (MNIST 47 MB, CIFAR-10 150 MB as uint8)
        self.images = data.images.to(self.device) if self.device.type == "cuda" else data.images

        # fixed validation timesteps and noise, and fixed sample noise: the same every epoch
        g = torch.Generator().manual_seed(1234)
        self.val_x0 = common.to_model_range(data.images[val_idx])
        self.val_t = torch.randint(0, args.timesteps, (len(val_idx),), generator=g)
        self.val_noise = torch.randn(self.val_x0.shape, generator=g)
        self.val_y = self.labels[val_idx] if self.labels is not None else None
        self.sample_y = None
        if self.labels is not None:  # a row of 8 per class
            self.sample_y = torch.arange(data.num_classes).repeat_interleave(8).to(self.device)
        n_samples = len(self.sample_y) if self.sample_y is not None else 64
        self.sample_noise = torch.randn((n_samples, *data.images.shape[1:]), generator=g)

    # -- the small named pieces of the loop -----------------------------------------------

    def learning_rate(self, step, elapsed):
        """Linear warmup, then constant, or a cosine or linear decay over the budget's progress
        in [0, 1].

        The decay spans --epochs, or --max-minutes if that runs out first. --max-steps only
        stops the run, so a run cut short by it and resumed follows the same schedule."""
        args = self.args
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        if args.lr_schedule != "constant":
            progress = step / self.total_steps
            if args.max_minutes is not None:  # a wall-clock budget may run out first
                progress = max(progress, elapsed / (60 * args.max_minutes))
            progress = min(progress, 1.0)
            lr *= 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_schedule == "cosine" else 1 - progress
        return lr

    def draw_timesteps(self, n):
        """Training timesteps: density ~ t^(power - 1) (--t-power), or EDM's log-normal noise
        levels (--sigma-lognormal)."""
        if self.args.sigma_lognormal is not None:
            return lognormal_timesteps(n, self.diffusion.alphas_cumprod, *self.args.sigma_lognormal,
                                       self.device)
        return training_timesteps(n, self.args.timesteps, self.args.t_power, self.device)

    def batch(self, order, b):
        """The b-th batch of this epoch."""
        return self.images_at(order[b * self.args.batch_size:(b + 1) * self.args.batch_size])

    def images_at(self, idx):
        """Training images idx: uint8 -> [-1, 1], in the model's layout, augmented; and labels."""
        x0 = common.to_model_range(self.images[idx.to(self.images.device)]).to(self.device)
        x0 = x0.contiguous(memory_format=self.layout)
        if self.augment is not None:
            x0 = self.augment(x0)
        y = self.labels[idx].to(self.device) if self.labels is not None else None
        return x0, y

    def reference_set(self):
        """--reference-size random training images and their labels, the stable target's
        reference set (GaussianDiffusion.loss), as keyword arguments for the loss."""
        if not self.reference_size:
            return {}
        pick = torch.randint(len(self.train_idx), (self.reference_size,))
        reference, reference_y = self.images_at(self.train_idx[pick])
        return {"reference": reference, "reference_y": reference_y}

    @torch.no_grad()
    def validation_loss(self):
        """The EMA model's loss at fixed t and noise on the held-out images: comparable across
        epochs and runs, whatever timestep density the training uses."""
        self.ema.copy_to(self.ema_model)
        total = 0.0
        for i in range(0, len(self.val_x0), 256):
            sl = slice(i, i + 256)
            x0 = self.val_x0[sl].to(self.device).contiguous(memory_format=self.layout)
            y = self.val_y[sl].to(self.device) if self.val_y is not None else None
            total += self.sampler.loss(x0, y, p_uncond=0.0, t=self.val_t[sl].to(self.device),
                                       noise=self.val_noise[sl].to(self.device), **self.val_extra).item() * len(x0)
        return total / len(self.val_x0)

    def sample_grid(self, path):
        """The EMA model's samples from the fixed noise, DDIM with --sample-steps, as a PNG."""
        self.ema.copy_to(self.ema_model)
        x = self.sampler.ddim_sample(self.sample_noise.shape, steps=self.args.sample_steps,
                                     noise=self.sample_noise, y=self.sample_y, guidance=self.args.guidance)
        common.save_grid(x, path, nrow=8)

    def progress_snapshot(self, last=False):
        """At steps 25, 50, 100, 200, ... (doubling) and at the end: the EMA model's samples
        from the same 8 noises, as one more row of progress.png, so a run shows its digits form."""
        q, r = divmod(self.state["step"], 25)
        if not last and (r or q & (q - 1)):  # only at 25 * 2^k
            return
        step = self.state["step"]
        self.ema.copy_to(self.ema_model)
        y = self.sample_y[::8][:8] if self.sample_y is not None else None  # one per class
        x = self.sampler.ddim_sample((8, *self.sample_noise.shape[1:]), steps=self.args.sample_steps,
                                     noise=self.sample_noise[:64:8][:8], y=y, guidance=self.args.guidance)
        self.progress[step] = common.to_uint8(x).cpu()
        steps = sorted(self.progress)
        common.image_rows_figure(
            [common.to_model_range(self.progress[k]) for k in steps], [f"step {k:,}" for k in steps],
            self.out_dir / "progress.png",
            f"The same 8 noises sampled with DDIM-{self.args.sample_steps} from the EMA weights "
            f"as training goes on")

    def log_loss(self, loss):
        """An exponential moving average of the training loss (weight 0.05 per step), kept every
        LOG_EVERY steps: a readable curve after minutes, where per-epoch points are too few."""
        a = 0.05
        self.smoothed_loss = loss if self.smoothed_loss is None else (1 - a) * self.smoothed_loss + a * loss
        if self.state["step"] % LOG_EVERY == 0:
            self.train_log[self.state["step"]] = self.smoothed_loss

    def elapsed(self):
        """Seconds of training in this run, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.time() - self.start

    def save(self, path):
        """One checkpoint dict (see README): config, weights, EMA, optimizer, counters, RNG, args."""
        rngs = [common.rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, common.rng_state())
        if self.main_proc:
            args = self.args
            common.save_checkpoint(
                {"kind": self.kind, "model_config": self.model_config,
                 "diffusion": {"timesteps": args.timesteps, "schedule": args.schedule,
                               "prediction": args.prediction},
                 "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.opt.state_dict(), "state": dict(self.state), "rng": rngs,
                 "elapsed_s": self.elapsed(), "progress": self.progress, "train_log": self.train_log,
                 "smoothed_loss": self.smoothed_loss, "args": plain(args),
                 "num_classes": self.num_classes},
                path)

    def end_of_epoch(self, epoch, train_loss, images_per_s):
        """Validation, metrics, pictures, checkpoints, early stopping. Returns True to stop.

        epoch counts finished epochs; after a budget stop it has a fraction, e.g. 3.4."""
        state, out_dir = self.state, self.out_dir
        self.model.eval()
        val = self.validation_loss()
        improved = state["best_val"] - val > self.args.min_delta
        if improved:
            state["best_val"], state["bad_epochs"] = val, 0
        else:
            state["bad_epochs"] += 1
        self.rows.append({"epoch": round(epoch, 3), "step": state["step"], "train_loss": train_loss,
                          "val_loss": val, "lr": self.opt.param_groups[0]["lr"],
                          "images_per_s": images_per_s, "elapsed_s": self.elapsed()})
        if self.main_proc:
            common.write_metrics(self.rows, out_dir / "metrics.csv")
            common.plot_loss_curve(self.rows, out_dir / "loss_curve.png", self.args.prediction,
                                   self.train_log, stable_targets=self.reference_size > 0)
            self.sample_grid(out_dir / f"samples_epoch{math.ceil(epoch):03d}.png")
            print(f"epoch {epoch:g} step {state['step']}: train {train_loss:.4f} "
                  f"val {val:.4f}{' (best)' if improved else ''} {images_per_s:.0f} img/s")
        self.save(out_dir / "last.pt")
        if improved:
            self.save(out_dir / "best.pt")
        return state["bad_epochs"] >= self.args.patience

    def stop_reason(self, stop_requests):
        """Why to stop after this step, or None: a budget, or Ctrl-C / SIGTERM."""
        args = self.args
        reason = None
        if args.max_steps is not None and self.state["step"] >= args.max_steps:
            reason = f"reached --max-steps {args.max_steps}"
        elif args.max_minutes is not None and self.elapsed() >= 60 * args.max_minutes:
            reason = f"reached --max-minutes {args.max_minutes}"
        elif stop_requests:
            reason = "interrupted"
        if self.world > 1:  # every rank must stop at the same step
            flag = torch.tensor([reason is not None], device=self.device, dtype=torch.int)
            dist.all_reduce(flag)
            reason = reason or ("another rank stopped" if flag.item() else None)
        return reason

    # -- the loop -------------------------------------------------------------------------

    def run(self):
        """Train until --epochs, a budget, early stopping or Ctrl-C. Returns the counters."""
        from tqdm.auto import tqdm
        args, state = self.args, self.state
        if self.main_proc:
            n_params = sum(p.numel() for p in self.model.parameters())
            targets = f" on stable targets ({self.reference_size} references)" if self.reference_size else ""
            print(f"{self.kind} model: {n_params / 1e6:.2f}M parameters, predicts {args.prediction}"
                  f"{targets}, {'Muon + AdamW' if args.optimizer == 'muon' else 'AdamW'}, "
                  f"{len(self.train_idx)} training images, {self.batches_per_epoch} steps per epoch, "
                  f"device {self.device}, {self.world} process(es), "
                  f"{'bf16 autocast' if self.bf16 else 'float32'}")
        self.start = time.time()
        self.last_eval_end, self.eval_cost = self.elapsed(), 0.0  # the first epoch is validated
        stop = self.stop_reason([])  # a budget may already be used up by the resumed run
        while state["epoch"] < args.epochs and stop is None:
            self.epoch_sampler.set_epoch(state["epoch"])
            order = self.train_idx[torch.tensor(list(self.epoch_sampler))]
            bar = tqdm(range(state["batch_in_epoch"], self.batches_per_epoch), disable=not self.main_proc,
                       desc=f"epoch {state['epoch'] + 1}", dynamic_ncols=True)
            epoch_start, epoch_images, images_per_s = time.time(), 0, 0.0
            self.model.train()
            for b in bar:
                # data
                x0, y = self.batch(order, b)

                # forward / backward: DDPM Alg. 1 on this batch, t drawn by draw_timesteps
                t = self.draw_timesteps(len(x0))
                reference = self.reference_set()  # {} unless --reference-size
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss = self.diffusion.loss(x0, y, p_uncond=args.p_uncond, t=t, **reference)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    fail(f"the loss became {loss.item()} at step {state['step']} (gradient norm "
                         f"{grad_norm.item()}); training stopped. The last good checkpoint in "
                         f"{self.out_dir} was kept. Try a lower --lr or a longer --warmup.")

                # optimizer step with the learning-rate schedule, then EMA of the weights
                for group in self.opt.param_groups:
                    group["lr"] = self.learning_rate(state["step"], self.elapsed())
                self.opt.step()
                self.ema.update(self.model)

                # logging
                state["step"] += 1
                state["batch_in_epoch"] = b + 1
                loss_value = loss.item()  # one device-to-host copy per step
                state["loss_sum"] += loss_value
                state["loss_count"] += 1
                self.log_loss(loss_value)
                epoch_images += len(x0) * self.world
                images_per_s = epoch_images / (time.time() - epoch_start)
                bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{images_per_s:.0f}")
                if self.main_proc:
                    self.progress_snapshot()

                # stop: budgets, Ctrl-C and SIGTERM
                stop = self.stop_reason(self.stop_requests)
                if stop:
                    break
            bar.close()

            if stop == "interrupted":  # save at once, skip the pictures
                self.save(self.out_dir / "last.pt")
                break

            # end of epoch (or of the budget): validation, pictures, checkpoint, early stop,
            # unless the last time was so recent that this work would exceed --eval-share of the time
            if state["batch_in_epoch"] == self.batches_per_epoch:  # a whole epoch
                state.update(epoch=state["epoch"] + 1, batch_in_epoch=0)
            due = (stop is not None or state["epoch"] >= args.epochs or self.elapsed() - self.last_eval_end
                   >= self.eval_cost * (1 / args.eval_share - 1))
            if self.world > 1:  # every rank must decide alike
                flag = torch.tensor([int(due)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                due = bool(flag.item())
            if not due:
                continue
            train_loss = state["loss_sum"] / max(state["loss_count"], 1)  # since the last time
            state.update(loss_sum=0.0, loss_count=0)
            progress = state["epoch"] + state["batch_in_epoch"] / self.batches_per_epoch
            eval_start = self.elapsed()
            if self.end_of_epoch(progress, train_loss, images_per_s) and stop is None:
                stop = f"early stopping: no improvement in {args.patience} validations"
            self.last_eval_end = self.elapsed()
            self.eval_cost = self.last_eval_end - eval_start
        return stop

    def finish(self, stop):
        """The final sample grid and a summary line; exit status 130 after an interruption."""
        if self.main_proc:
            print(f"stopped: {stop or f'finished {self.args.epochs} epochs'}; "
                  f"best validation loss {self.state['best_val']:.4f}")
            if stop == "interrupted":
                print(f"saved {self.out_dir / 'last.pt'}; continue with --resume {self.out_dir / 'last.pt'}")
            else:
                self.sample_grid(self.out_dir / "samples.png")
                self.progress_snapshot(last=True)
                print(f"wrote {self.out_dir / 'samples.png'}, progress.png, last.pt, best.pt, "
                      f"metrics.csv, loss_curve.png")
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        if stop == "interrupted":
            raise SystemExit(130)


def train(args, kind, module, model_config, data, augment=None, ckpt=None):
    """Train `module`.DiffusionModel(**model_config) on `data`; write checkpoints and pictures.
    Returns the Trainer: its .state (counters), .model and .ema."""
    trainer = Trainer(args, kind, module, model_config, data, augment, ckpt)
    # Ctrl-C (SIGINT) and SIGTERM (kill, job schedulers) ask the loop to stop after the
    # current step, so last.pt is consistent and --resume continues exactly
    handlers = {}
    if trainer.main_proc and trainer.world == 1:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: trainer.stop_requests.append(True))
    try:
        stop = trainer.run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    trainer.finish(stop)
    return trainer
