"""The training loop both training scripts share: DDPM Algorithm 1 and the bookkeeping around it.

Read Trainer.train_step first: one step of Algorithm 1 and of the optimizer. Trainer.run is
the loop around it, with a comment on each phase (data, step, logging, budgets). Everything
else is a small named method: learning_rate, validation_loss, sample_grid, save,
end_of_epoch. The command line lives in train_args.py, the Muon optimizer in optimizers.py.
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
from optimizers import make_optimizer
from train_args import RUN_FILES, RUN_GLOBS, plain

LOG_EVERY = 25  # steps between points of the smoothed training loss in loss_curve.png


def training_timesteps(n, num_timesteps, power, device, generator=None):
    """n training timesteps drawn with density p(t) about proportional to t^(power - 1).

    power = 1 is DDPM's uniform t. power = 2 samples t in proportion to t: three quarters of
    the batch falls in the noisier half of the process. In expectation this is the uniform-t
    loss weighted by T p(t); the best prediction at each t is unchanged.
    """
    u = torch.rand(n, device=device, generator=generator)
    return (num_timesteps * u ** (1.0 / power)).long().clamp_(max=num_timesteps - 1)


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
# The trainer


class Trainer:
    """Everything one training run holds: model, EMA, optimizer, data, counters, output folder.

    kind: 'mnist' or 'cifar', stored in the checkpoint. augment: optional function applied to
    each float batch x -> x, such as random flips. ckpt: a checkpoint to resume from (see
    prepare_args). init: a checkpoint whose EMA weights a new run starts from (--init-from).
    """

    def __init__(self, args, kind, module, model_config, data, augment=None, ckpt=None, init=None):
        self.args, self.kind, self.augment = args, kind, augment
        self.module = module
        # stable targets (diffusion.stable_targets): an option of train_diffusion.py only
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
        # caller left to its default is stored too
        self.model_config = self.model.config
        if init is not None:
            self.start_from(init)
        self.ema = module.EMA(self.model, args.ema_decay, args.ema_power)
        self.ema_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        # the EMA weights' process, for validation and sample grids; a self-conditioned network
        # is validated the same way every time: always with its own first guess of x0
        self.sampler = common.make_diffusion(module, self.ema_model, self.model_config, args.timesteps,
                                             args.schedule, args.prediction, p_self_cond=1.0).to(self.device)
        self.opt = make_optimizer(self.model, args.optimizer, args.lr, args.weight_decay, self.device)
        self.state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "loss_sum": 0.0, "loss_count": 0,
                      "best_val": math.inf, "bad_epochs": 0}
        self.elapsed_before = 0.0  # seconds of training in earlier sessions of a resumed run
        self.rows = []
        self.progress = {}  # step -> uint8 samples from the same 8 noises: progress.png
        self.train_log = {}  # step -> training loss, smoothed, every LOG_EVERY steps
        self.smoothed_loss = None
        self.stop_requests = []  # filled by the Ctrl-C / SIGTERM handler that train() installs
        # every random draw of a training step comes from this generator, which checkpoints
        # save and restore; torch's global stream is left to dropout (saved too)
        self.gen = torch.Generator(device=self.device).manual_seed(args.seed + self.rank)
        if ckpt is not None:
            self.restore(ckpt)
        else:
            torch.manual_seed(args.seed + self.rank)  # a different dropout stream on each rank

        train_model = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            train_model = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if args.compile:
            train_model = torch.compile(train_model)
        self.diffusion = common.make_diffusion(module, train_model, self.model_config, args.timesteps,
                                               args.schedule, args.prediction, generator=self.gen).to(self.device)
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

    def start_from(self, init):
        """--init-from: the network starts as that model's EMA weights. A class embedding the
        model lacks (fine-tuning an unconditional model with --class-cond) starts at zero: it is
        added to the time embedding, so the new network computes exactly what the old one did,
        for every label, and training teaches it the classes from there."""
        n = init["model_config"].get("num_classes")
        if n and self.num_classes != n:
            fail(f"{self.args.init_from} is a model of {n} classes; the data set has "
                 f"{self.num_classes or 'no'} classes")
        try:
            missing, unexpected = self.model.load_state_dict(init["ema"]["shadow"], strict=False)
        except RuntimeError as e:  # a tensor of the wrong shape
            missing, unexpected = [str(e).splitlines()[-1].strip()], []
        added = [k for k in missing if k.startswith("class_embed.")]
        if unexpected or len(added) != len(missing):
            fail(f"the weights of {self.args.init_from} do not fit its model config "
                 f"(missing or wrong: {missing[:2]}, unexpected: {unexpected[:2]})")
        with torch.no_grad():
            for k in added:
                self.model.get_parameter(k).zero_()
        if self.main_proc:
            print(f"starting from the weights of {self.args.init_from}"
                  + (", with a new class embedding at zero" if added else ""))

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
        try:
            if len(rngs) == self.world:  # the same number of processes: continue each stream
                common.set_rng_state(rngs[self.rank])
                self.gen.set_state(rngs[self.rank]["train"])
            else:
                torch.manual_seed(self.args.seed + self.rank + 1000 * self.state["step"])
                self.gen.manual_seed(self.args.seed + self.rank + 1000 * self.state["step"])
        except (KeyError, TypeError, RuntimeError, ValueError) as e:
            fail(f"{self.args.resume} holds a damaged random-number state ({type(e).__name__}); "
                 f"it can be sampled from, not resumed")
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
        """Linear warmup, then constant, or a cosine decay over the budget's progress in [0, 1].

        The decay spans --epochs, or --max-minutes if that runs out first. --max-steps only
        stops the run, so a run cut short by it and resumed follows the same schedule."""
        args = self.args
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        if args.lr_schedule != "constant":
            progress = step / self.total_steps
            if args.max_minutes is not None:  # a wall-clock budget may run out first
                progress = max(progress, elapsed / (60 * args.max_minutes))
            progress = min(progress, 1.0)
            lr *= 0.5 * (1 + math.cos(math.pi * progress))
        return lr


    def batch(self, order, b):
        """The b-th batch of this epoch."""
        return self.images_at(order[b * self.args.batch_size:(b + 1) * self.args.batch_size])

    def images_at(self, idx):
        """Training images idx: uint8 -> [-1, 1], in the model's layout, augmented; and labels."""
        x0 = common.to_model_range(self.images[idx.to(self.images.device)]).to(self.device)
        x0 = x0.contiguous(memory_format=self.layout)
        if self.augment is not None:
            x0 = self.augment(x0, self.gen)
        y = self.labels[idx].to(self.device) if self.labels is not None else None
        return x0, y

    def reference_set(self):
        """--reference-size random training images and their labels: the pool of stable
        targets (diffusion.stable_targets), beside the batch's own images."""
        pick = torch.randint(len(self.train_idx), (self.reference_size,), generator=self.gen,
                             device=self.gen.device).cpu()
        return self.images_at(self.train_idx[pick])

    def stable_targets(self, x0, labels, y, t, noise, reference):
        """(x0_target, noise_target) over the pool of the batch and the references. A
        conditional x_t can only have come from an image of its class; a dropped label
        (the null class) from any."""
        pool, allowed = torch.cat([x0, reference[0].to(x0.dtype)]), None
        if y is not None:
            pool_y = torch.cat([labels, reference[1]])
            allowed = (pool_y[None] == y[:, None]) | (y[:, None] == self.module.NULL_CLASS)
        return self.module.stable_targets(self.diffusion, x0, t, noise, pool, allowed)

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
            total += self.sampler.loss(x0, y, t=self.val_t[sl].to(self.device),
                                       noise=self.val_noise[sl].to(self.device)).item() * len(x0)
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

    def diverged(self, what, detail=""):
        """Stop a run that diverged, before it writes anything: the last good checkpoint stays."""
        fail(f"{what} at step {self.state['step']}{detail}: training diverged and stopped. The last good "
             f"checkpoint in {self.out_dir} was kept. Try a lower --lr or a longer --warmup.")

    def elapsed(self):
        """Seconds of training in this run, earlier sessions of a resumed run included."""
        return self.elapsed_before + time.time() - self.start

    def save(self, path):
        """One checkpoint dict (see README): config, weights, EMA, optimizer, counters, RNG, args.
        Weights that are not finite are never written: the run stops, the last good file stays."""
        weights = list(self.model.state_dict().values()) + list(self.ema.shadow.values())
        if not all(torch.isfinite(w).all() for w in weights if w.is_floating_point()):
            self.diverged("the weights are no longer finite")
        rngs = [dict(common.rng_state(), train=self.gen.get_state())]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, dict(common.rng_state(), train=self.gen.get_state()))
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
        if not math.isfinite(val):
            self.diverged(f"the validation loss became {val}")
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
                  f"val {val:.4f}{' (best)' if improved else ''}"
                  + (f" {images_per_s:.0f} img/s" if images_per_s else ""))  # none: no step since the resume
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

    # -- one step, and the loop -----------------------------------------------------------

    def train_step(self, x0, labels):
        """DDPM Alg. 1, lines 3-5, on one batch, then the optimizer and the EMA. Returns the loss.

        The improvements of the fast recipe are each one named line: the timestep density
        (--t-power), label dropout (classifier-free guidance, with --class-cond), and stable
        targets (--reference-size). Self-conditioning lives in the denoiser that self.diffusion
        calls (diffusion.SelfConditionedDiffusion); Muon in self.opt (optimizers.py)."""
        args = self.args
        t = training_timesteps(len(x0), args.timesteps, args.t_power, self.device, self.gen)  # line 3
        reference = self.reference_set() if self.reference_size else None
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)  # line 4: eps ~ N(0, I)
        noise = noise.contiguous(memory_format=self.layout)
        y = self.module.drop_labels(labels, args.p_uncond, self.gen)  # classifier-free guidance
        x0_target, noise_target = x0, noise
        if reference is not None:  # stable targets: the same x_t, a less noisy target
            x0_target, noise_target = self.stable_targets(x0, labels, y, t, noise, reference)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.diffusion.loss(x0_target, y, t, noise_target)  # line 5: L_simple
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            self.diverged(f"the loss became {loss.item()}", f" (gradient norm {grad_norm.item()})")
        for group in self.opt.param_groups:  # the learning-rate schedule
            group["lr"] = self.learning_rate(self.state["step"], self.elapsed())
        self.opt.step()  # line 5: the gradient step
        self.ema.update(self.model)
        return loss

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
                # data, then one step of Algorithm 1 and the optimizer
                x0, y = self.batch(order, b)
                loss = self.train_step(x0, y)

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


def train(args, kind, module, model_config, data, augment=None, ckpt=None, init=None):
    """Train `module`.DiffusionModel(**model_config) on `data`; write checkpoints and pictures.
    Returns the Trainer: its .state (counters), .model and .ema."""
    trainer = Trainer(args, kind, module, model_config, data, augment, ckpt, init)
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
