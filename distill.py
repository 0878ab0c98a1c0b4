"""Progressive distillation: a student learns to do in one DDIM step what its teacher does in two.

Example: python distill.py --teacher runs/mnist/last.pt --teacher-steps 64 --student-steps 4

Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
arXiv:2202.00512, Algorithm 2. Deterministic DDIM (eta 0) is a fixed map from noise to image;
a network can learn a shortcut through it. Round after round, N -> N/2:

    the student starts as a copy of the teacher
    repeat (for --round-minutes or --round-steps):
        x ~ data, i ~ uniform over the student's N steps: t -> t'' on its grid, t' between
        z_t  = alpha_t x + sigma_t eps                                   DDPM Eq. 4
        z_t' = DDIM step t -> t' with the teacher, z_t'' = DDIM step t' -> t''   (eta 0)
        x~   = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
        descend on (1 + SNR_t) ||x~ - x_student(z_t)||^2, which is the MSE of v
    the student becomes the next round's teacher

x~ is the x0 for which ONE DDIM step from z_t lands on z_t'', where the teacher's two steps
land: DDIM's step z_t'' = alpha'' x0 + sigma'' (z_t - alpha x0) / sigma, solved for x0.
The grids nest (diffusion.distilled_timesteps): a student step covers two teacher steps exactly.

Choices, and why:
- The first teacher samples as DDIM does here, with x0 clipped to [-1, 1]. Students are not
  clipped: the x~ they learn may leave [-1, 1], and clipping would move their steps away from
  the teacher's.
- A self-conditioned teacher (diffusion.SelfConditionedDiffusion) is asked with its own first
  guess of x0, as in its training: a deterministic denoiser of z_t alone, so the target is a
  function of z_t. The student sees no estimate (zeros): its one step from z_t must reach the
  target by itself, and an estimate from its previous step, twice as far away each round, is
  not one it could learn from. It also keeps one network call per step.
- A teacher must predict v: the paper (Sec. 4) shows that with eps, x0 = (z - sigma eps) /
  alpha is unstable where alpha ~ 0, and the first student step starts in pure noise.
- The student trains with AdamW, its learning rate decayed linearly to 0 over each round (the
  paper's Sec. 5), and keeps an EMA; the EMA weights are the round's student.

Writes student_N.pt after each round (EMA weights and config: every sampling script loads it,
and it samples only with its N steps), distill_rounds.png (the same noises through every
round) and distill_state.pt while a round runs (Ctrl-C saves it; --resume continues exactly).
"""

import argparse
import importlib
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from common import fail
from train_args import plain

STATE_FILE = "distill_state.pt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--teacher", help="a checkpoint of either model (v-prediction); or a student_N.pt "
                                     "to go on halving")
    p.add_argument("--teacher-steps", type=int, default=64,
                   help="the first teacher's DDIM steps; its student has half as many")
    p.add_argument("--student-steps", type=int, default=4,
                   help="the last student's steps: rounds halve --teacher-steps down to this")
    p.add_argument("--round-minutes", type=float, default=None,
                   help="wall-clock budget of each round, minutes (default 5, unless --round-steps is given)")
    p.add_argument("--round-steps", type=int, default=None,
                   help="optimizer steps per round; with both budgets, a round ends at the first")
    p.add_argument("--batch-size", type=int, default=64, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="AdamW's learning rate at the start of each round, decayed linearly to 0")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the student's weights")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--data-dir", default="./data", help=common.DATA_DIR_HELP)
    p.add_argument("--out-dir", default=None,
                   help="where students go (default runs/distill, or with --resume the state's folder)")
    p.add_argument("--overwrite", action="store_true", help="replace students already in --out-dir")
    p.add_argument("--amp", choices=["auto", "none", "bf16"], default="auto",
                   help="bfloat16 autocast for the network calls; auto: where the hardware has fast bf16")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=common.seed_arg, default=0, help="random seed")
    p.add_argument("--resume", default=None, help=f"continue from this {STATE_FILE}")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# The math of one distillation step (Algorithm 2)


def alpha_sigma(diffusion, t):
    """alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t) per image, shaped (B, 1, 1, 1);
    t = -1 stands for x0 itself, where alpha = 1 and sigma = 0."""
    abar = torch.cat([diffusion.alphas_cumprod, diffusion.alphas_cumprod.new_ones(1)])  # [-1] is x0
    a = abar[t].reshape(-1, 1, 1, 1)
    return a.sqrt(), (1 - a).sqrt()


def denoise(diffusion, z, t, y, clip):
    """The model's x0 at (z_t, t), t one timestep per image; clip: to [-1, 1]."""
    x0, _ = diffusion.x0_and_eps(z, t, diffusion.network(z, t, y))
    return x0.clamp(-1, 1) if clip else x0


def ddim_step(diffusion, z, t, t_next, y, clip):
    """DDIM with eta 0 from t to t_next, as Alg. 2 writes it:
    z_next = alpha_next x0 + (sigma_next / sigma_t) (z_t - alpha_t x0)."""
    a, s = alpha_sigma(diffusion, t)
    a_next, s_next = alpha_sigma(diffusion, t_next)
    x0 = denoise(diffusion, z, t, y, clip)
    return a_next * x0 + s_next / s * (z - a * x0)


def target_x0(diffusion, z, t, z_next, t_next):
    """x~: the x0 for which one DDIM step from (z_t, t) lands on z_next at t_next (Alg. 2)."""
    a, s = alpha_sigma(diffusion, t)
    a_next, s_next = alpha_sigma(diffusion, t_next)
    ratio = s_next / s
    return (z_next - ratio * z) / (a_next - ratio * a)


def distillation_loss(student, teacher, x0, y, i, grid, mid, clip_teacher, noise):
    """Alg. 2 for one batch: student step i (t = grid[i] -> grid[i + 1]) against two teacher
    steps through mid[i]. Returns the student's loss, the MSE of v: (1 + SNR) ||x~ - x||^2."""
    t, t_mid, t_next = grid[i], mid[i], grid[i + 1]
    a, s = alpha_sigma(student, t)
    z = a * x0 + s * noise  # DDPM Eq. 4
    with torch.no_grad():  # two DDIM steps of the teacher
        z_mid = ddim_step(teacher, z, t, t_mid, y, clip_teacher)
        z_next = ddim_step(teacher, z_mid, t_mid, t_next, y, clip_teacher)
        x_target = target_x0(teacher, z, t, z_next, t_next).float()
    v_target = (a * z - x_target) / s  # x = alpha z - sigma v  =>  MSE(v) = MSE(x) / sigma^2
    return F.mse_loss(student.network(z, t, y).float(), v_target)


# ----------------------------------------------------------------------------------------
# Rounds


class Distiller:
    """One distillation run: the teacher checkpoint, the data, and the round in progress."""

    def __init__(self, args, state=None):
        self.args = args
        self.device = common.pick_device(args.device)
        self.bf16 = common.use_bf16(args.amp, self.device)
        self.out_dir = Path(args.out_dir)
        self.first = state["first_teacher"] if state else self.read_teacher(args.teacher)
        cfg = self.first["model_config"]
        targs = self.first.get("args", {})
        data = common.load_dataset(targs.get("dataset", "mnist" if self.first["kind"] == "mnist" else "cifar10"),
                                   args.data_dir, cfg["image_size"], cfg["channels"])
        self.train_idx, _ = common.split_train_val(len(data.images), targs.get("val_size", 1000))
        self.images = data.images
        self.labels = data.labels if cfg.get("num_classes") else None
        self.p_uncond = targs.get("p_uncond", 0.0) if self.labels is not None else 0.0
        g = torch.Generator().manual_seed(1234)  # the same picture noises in every round
        self.picture_noise = torch.randn((8, cfg["channels"], cfg["image_size"], cfg["image_size"]), generator=g)
        self.gen = torch.Generator().manual_seed(args.seed)
        self.history = state["history"] if state else []
        self.pictures = dict(state["pictures"]) if state else {}
        self.stop_requests = []
        self.module = importlib.import_module(common.MODEL_MODULES[self.first["kind"]])

    @staticmethod
    def read_teacher(path):
        ckpt = common.load_checkpoint(path)
        if ckpt["diffusion"]["prediction"] != "v":
            fail(f"{path} predicts eps; progressive distillation needs a v-prediction teacher "
                 f"(Salimans & Ho 2022, Sec. 4: x0 from eps is unstable in pure noise, where the "
                 f"first student step starts). Train one with --prediction v (the default recipe)")
        first = {k: ckpt[k] for k in ("kind", "model_config", "diffusion", "args") if k in ckpt}
        first["weights"] = ckpt["ema"]["shadow"]
        first["steps"] = common.distilled_steps(ckpt)  # a student goes on halving
        first["path"] = str(path)
        return first

    def processes(self, weights, student_steps=None):
        """(network, its process) from EMA weights, built as common.model_from_checkpoint builds
        a checkpoint's; with student_steps, a student's: no x0 estimate, its own grid."""
        ckpt = {**{k: self.first[k] for k in ("kind", "model_config", "diffusion")},
                "ema": {"shadow": weights}}
        if student_steps is not None:
            ckpt["distilled"] = {"steps": student_steps}
        model, diffusion, _ = common.model_from_checkpoint(ckpt, self.device)
        return model, diffusion

    def rounds(self):
        """(teacher steps, student steps) of every round."""
        n, out = self.args.teacher_steps, []
        while n > self.args.student_steps:
            out.append((n, n // 2))
            n //= 2
        return out

    def batch(self):
        pick = self.train_idx[torch.randint(len(self.train_idx), (self.args.batch_size,), generator=self.gen)]
        x0 = common.to_model_range(self.images[pick]).to(self.device)
        y = None
        if self.labels is not None:
            y = self.module.drop_labels(self.labels[pick], self.p_uncond, self.gen).to(self.device)
        return x0, y

    def start_round(self, teacher_steps, student_steps, teacher_weights, teacher_distilled, resume=None):
        """The round's teacher, its student (a copy of it: theta <- eta), EMA, optimizer and step
        grids, restored from `resume` when given. Returns them as one namespace."""
        _, teacher = self.processes(teacher_weights, teacher_steps if teacher_distilled else None)
        teacher.requires_grad_(False)
        model, student = self.processes(teacher_weights, student_steps)
        model.train()
        r = argparse.Namespace(
            teacher_steps=teacher_steps, student_steps=student_steps, teacher_weights=teacher_weights,
            teacher_distilled=teacher_distilled, teacher=teacher, student=student, model=model,
            ema=self.module.EMA(model, self.args.ema_decay),
            opt=torch.optim.AdamW(model.parameters(), lr=self.args.lr, weight_decay=0.0),
            step=0, elapsed_before=0.0)
        # the student's grid, ending on x0 (-1), and the teacher's steps in between
        abar = student.alphas_cumprod_f64
        r.grid = torch.tensor(self.module.distilled_timesteps(abar, student_steps) + [-1], device=self.device)
        r.mid = torch.tensor(self.module.distilled_timesteps(abar, teacher_steps)[1::2], device=self.device)
        if resume is not None:
            model.load_state_dict(resume["student"])
            r.ema.load_state_dict(resume["ema"])
            r.opt.load_state_dict(resume["optimizer"])
            r.step, r.elapsed_before = resume["step"], resume["elapsed_s"]
            self.gen.set_state(resume["rng"]["gen"])
            torch.set_rng_state(resume["rng"]["torch"])
        else:  # a round starts: what a crash would resume from
            self.save_state(r, 0.0)
        return r

    def train_step(self, r, progress):
        """Alg. 2 on one batch (x, the student's step i, eps), then AdamW and the EMA."""
        x0, y = self.batch()
        i = torch.randint(r.student_steps, (len(x0),), generator=self.gen).to(self.device)
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = distillation_loss(r.student, r.teacher, x0, y, i, r.grid, r.mid,
                                     not r.teacher_distilled, noise)
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), self.args.grad_clip)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            fail(f"the loss became {loss.item()} at step {r.step} of round {r.teacher_steps} -> "
                 f"{r.student_steps}: distillation diverged; try a lower --lr")
        for group in r.opt.param_groups:
            group["lr"] = self.args.lr * (1 - progress)  # linear decay to 0 over the round
        r.opt.step()
        r.ema.update(r.model)
        r.step += 1
        return loss.item()

    def run_round(self, teacher_steps, student_steps, teacher_weights, teacher_distilled, resume=None):
        """Train one student for the round's budget. Returns its EMA weights, the optimizer
        steps, the minutes and the smoothed final loss."""
        from tqdm.auto import tqdm
        args = self.args
        r = self.start_round(teacher_steps, student_steps, teacher_weights, teacher_distilled, resume)
        budget_s = args.round_minutes * 60 if args.round_minutes else math.inf
        start = time.time()
        bar = tqdm(total=args.round_steps, initial=r.step, dynamic_ncols=True,
                   desc=f"round {teacher_steps} -> {student_steps} steps")
        smoothed = None
        while True:
            elapsed = r.elapsed_before + time.time() - start
            # the round's progress in [0, 1], by steps if they are the budget (exact on resume)
            progress = r.step / args.round_steps if args.round_steps else elapsed / budget_s
            if progress >= 1 or elapsed >= budget_s:
                break
            if self.stop_requests:
                self.save_state(r, elapsed)
                bar.close()
                print(f"interrupted; continue with --resume {self.out_dir / STATE_FILE}")
                raise SystemExit(130)
            loss = self.train_step(r, progress)
            smoothed = loss if smoothed is None else 0.95 * smoothed + 0.05 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}")
        bar.close()
        return r.ema.shadow, r.step, (r.elapsed_before + time.time() - start) / 60, smoothed

    # -- files -----------------------------------------------------------------------------

    def save_student(self, weights, steps, teacher_steps, optimizer_steps, minutes):
        """student_N.pt: weights-only (EMA), with the record of its distillation."""
        path = self.out_dir / f"student_{steps}.pt"
        common.save_checkpoint(
            {"kind": self.first["kind"], "model_config": self.first["model_config"],
             "diffusion": self.first["diffusion"], "args": self.first.get("args", {}),
             "ema": {"shadow": weights},
             "distilled": {"steps": steps, "teacher_steps": teacher_steps,
                           "first_teacher": self.first["path"], "optimizer_steps": optimizer_steps,
                           "minutes": minutes, "settings": plain(self.args)}},
            path)
        return path

    def save_state(self, r, elapsed):
        """distill_state.pt: the round in progress, with everything --resume needs."""
        common.save_checkpoint(
            {"kind": "distill_state", "first_teacher": self.first, "args": plain(self.args),
             "round": {"teacher_steps": r.teacher_steps, "student_steps": r.student_steps,
                       "teacher_distilled": r.teacher_distilled},
             "teacher": r.teacher_weights, "student": r.model.state_dict(), "ema": r.ema.state_dict(),
             "optimizer": r.opt.state_dict(), "step": r.step, "elapsed_s": elapsed,
             "rng": {"gen": self.gen.get_state(), "torch": torch.get_rng_state()},
             "history": self.history, "pictures": self.pictures},
            self.out_dir / STATE_FILE)

    @torch.no_grad()
    def picture(self, weights, steps, distilled, label):
        """The same 8 noises, sampled with `steps` steps (a student's: its own grid): one row of
        distill_rounds.png."""
        _, diffusion = self.processes(weights, steps if distilled else None)
        x = common.sample(diffusion, "ddim", self.picture_noise.shape, steps,
                          noise=self.picture_noise.to(self.device))
        self.pictures[label] = common.to_uint8(x).cpu()
        common.image_rows_figure([common.to_model_range(v) for v in self.pictures.values()],
                                 list(self.pictures), self.out_dir / "distill_rounds.png",
                                 "The same 8 noises: the teacher, then each round's student with half "
                                 "the steps of the one before")


def check_args(args):
    common.check_finite(lr=args.lr, round_minutes=args.round_minutes, ema_decay=args.ema_decay,
                        grad_clip=args.grad_clip)
    if (args.round_minutes is not None and args.round_minutes <= 0) or not args.lr > 0 or args.grad_clip <= 0:
        fail("--round-minutes, --lr and --grad-clip must be positive")
    if not 0 <= args.ema_decay < 1:
        fail(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    common.check_range("batch_size", args.batch_size, 1, common.LIMITS["batch_size"])
    if args.round_steps is not None:
        common.check_range("round_steps", args.round_steps, 1, 10 ** 9)
    common.check_range("student_steps", args.student_steps, 1, common.LIMITS["timesteps"])
    common.check_range("teacher_steps", args.teacher_steps, 2, common.LIMITS["timesteps"])
    n = args.teacher_steps
    while n > args.student_steps and n % 2 == 0:
        n //= 2
    if n != args.student_steps or args.teacher_steps == args.student_steps:
        fail(f"--teacher-steps ({args.teacher_steps}) must be --student-steps ({args.student_steps}) "
             f"times a power of 2 (64 -> 32 -> 16 -> 8 -> 4), larger than it")


def read_state(path):
    """distill_state.pt, read safely and checked before anything is built from it."""
    path = Path(path)
    if not path.is_file():
        fail(f"--resume {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"could not read {path}: it is corrupted or not a distillation state ({type(e).__name__})")
    if not isinstance(state, dict) or state.get("kind") != "distill_state":
        fail(f"{path} is not a {STATE_FILE} of distill.py; --resume takes the state that an "
             f"interrupted distillation wrote")
    return state


def main(args):
    state = None
    if args.resume:
        state = read_state(args.resume)
        saved = argparse.Namespace(**{**state["args"], "resume": args.resume, "device": args.device})
        saved.out_dir = args.out_dir or str(Path(args.resume).parent)
        args = saved
        r = state["round"]
        print(f"resuming round {r['teacher_steps']} -> {r['student_steps']} at step {state['step']}, "
              f"with the run's own settings (only --device and --out-dir can change)")
    elif args.teacher is None:
        fail("give --teacher CHECKPOINT (or --resume a distill_state.pt)")
    if args.round_minutes is None and args.round_steps is None:
        args.round_minutes = 5.0
    check_args(args)
    if args.out_dir is None:
        args.out_dir = "runs/distill"
    out_dir = common.check_writable_dir(args.out_dir)
    distiller = Distiller(args, state)
    first = distiller.first
    T = first["diffusion"]["timesteps"]
    if args.teacher_steps > T:
        fail(f"--teacher-steps ({args.teacher_steps}) cannot exceed the teacher's T = {T}")
    if first["steps"] is not None and first["steps"] != args.teacher_steps:
        fail(f"the teacher is a {first['steps']}-step student; distil it further with "
             f"--teacher-steps {first['steps']}")
    rounds = distiller.rounds()
    if not args.resume and not args.overwrite:
        existing = [f"student_{n}.pt" for _, n in rounds if (out_dir / f"student_{n}.pt").exists()]
        if existing:
            fail(f"{out_dir} already holds {', '.join(existing)}; pick another --out-dir or pass --overwrite")

    handlers = {s: signal.signal(s, lambda *_: distiller.stop_requests.append(True))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        weights, distilled = first["weights"], first["steps"] is not None
        resume = None
        if state is not None:
            r = state["round"]
            weights, distilled, resume = state["teacher"], r["teacher_distilled"], state
            rounds = [(n, m) for n, m in rounds if n <= r["teacher_steps"]]
        if not distiller.pictures:
            distiller.picture(weights, args.teacher_steps, distilled, f"teacher\nDDIM-{args.teacher_steps}")
        for teacher_steps, student_steps in rounds:
            w, n_steps, minutes, loss = distiller.run_round(teacher_steps, student_steps, weights,
                                                               distilled, resume)
            resume = None
            path = distiller.save_student(w, student_steps, teacher_steps, n_steps, minutes)
            distiller.history.append({"teacher_steps": teacher_steps, "student_steps": student_steps,
                                      "optimizer_steps": n_steps, "minutes": round(minutes, 3),
                                      "final_loss": loss})
            distiller.picture(w, student_steps, True, f"student\n{student_steps} steps")
            print(f"round {teacher_steps} -> {student_steps}: {n_steps} steps in {minutes:.1f} min, "
                  f"loss {loss:.4f}; wrote {path}")
            weights, distilled = w, True
        (out_dir / STATE_FILE).unlink(missing_ok=True)  # finished: nothing left to resume
        (out_dir / "distill_log.json").write_text(json.dumps(distiller.history, indent=2))
        print(f"wrote {out_dir}/distill_rounds.png, distill_log.json")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return distiller


if __name__ == "__main__":
    common.run(main, parse_args)
