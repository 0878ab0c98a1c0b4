"""The command line of the two training scripts: recipes, the shared options, their checks,
and what a resumed run takes from its checkpoint. training.py holds the loop itself.
"""

import argparse
import sys
from pathlib import Path

import common
from common import fail

DEFAULT_OUT_DIRS = {"mnist": "runs/mnist", "cifar": "runs/cifar10"}
# What a run writes into its --out-dir; --overwrite removes exactly these before a new run.
RUN_FILES = ["last.pt", "best.pt", "metrics.csv", "loss_curve.png", "samples.png", "progress.png"]
RUN_GLOBS = ["samples_epoch*.png", "samples_step*.png", "*.tmp"]
# Settings a resumed run cannot change: the network, its diffusion process, the optimizer
# (its state is that optimizer's), the batches an epoch is cut into, and the data split.
FIXED_ON_RESUME = {"timesteps", "schedule", "prediction", "optimizer", "batch_size", "val_size",
                   "seed", "dataset", "class_cond", "image_size", "hidden_dims", "time_dim",
                   "self_cond", "reference_size", "preset", "dropout", "recipe", "no_flip"}


def parse(p, recipes, argv=None):
    """Parse argv with parser p, whose defaults come from the recipe named by --recipe.

    The recipe's settings become p's defaults, so --help shows the values a run will use
    (--help --recipe NAME shows another recipe's) and any flag given overrides its recipe.
    The result also knows which flags the command line gave (args.explicit): a resumed run
    takes every other setting from its checkpoint (prepare_args)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--recipe", choices=sorted(recipes), default=next(iter(recipes)))
    recipe = first.parse_known_args(argv)[0].recipe
    p.set_defaults(**recipes[recipe])
    args = p.parse_args(argv)
    # parse once more with every default suppressed: what is left was typed
    saved, saved_parser = {a.dest: a.default for a in p._actions}, p._defaults
    for action in p._actions:
        action.default = argparse.SUPPRESS
    p._defaults = {}
    try:
        args.explicit = sorted(vars(p.parse_args(argv)))
    finally:
        for action in p._actions:
            action.default = saved[action.dest]
        p._defaults = saved_parser
    return args


def recipe_help(recipes):
    """One line per recipe with its settings, for the --recipe help."""
    return "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in r.items()) for name, r in recipes.items())


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
      help="peak learning rate (of AdamW, and of Muon with steps of AdamW's size: optimizers.Muon)")
    a("--optimizer", choices=["adamw", "muon"], default="adamw",
      help="adamw, or muon: Muon for the hidden layers' weight matrices, AdamW for the rest "
           "(optimizers.Muon), at the same --lr")
    a("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    a("--warmup", type=int, default=500, help="linear learning-rate warmup, in steps")
    a("--lr-schedule", choices=["constant", "cosine"], default="constant",
      help="after warmup: constant, or a cosine decay to 0 over --epochs or --max-minutes, "
           "whichever runs out first")
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
    a("--seed", type=common.seed_arg, default=0, help="random seed")
    a("--resume", default=None, help="continue from this last.pt (or best.pt)")
    a("--init-from", default=None,
      help="start a new run from this model's weights (a checkpoint or a pretrained/ file): "
           "fine-tuning. The network and its process come from it; the optimizer, counters and "
           "every other setting start afresh. With --class-cond an unconditional model gains a "
           "class embedding that starts at zero, so the run starts from exactly that model")


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
    common.check_range("timesteps", args.timesteps, 1, common.LIMITS["timesteps"])
    common.check_range("batch_size", args.batch_size, 1, common.LIMITS["batch_size"])
    if not 0 < args.t_power <= 10:
        fail(f"--t-power must be in (0, 10], got {args.t_power}")
    if args.schedule not in ("linear", "cosine") or args.prediction not in ("eps", "v") or \
            args.lr_schedule not in ("constant", "cosine") or args.optimizer not in ("adamw", "muon"):
        fail(f"unknown schedule {args.schedule!r}, prediction {args.prediction!r}, lr schedule "
             f"{args.lr_schedule!r} or optimizer {args.optimizer!r} (a damaged checkpoint?)")
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
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "explicit"}


def check_stored_types(stored, current, state, path):
    """A damaged or tampered checkpoint's settings and counters must have the types this
    script's own arguments have (an int may stand for a float), or resuming fails clearly."""
    def same_kind(value, like):
        if like is None or value is None:
            return True
        if isinstance(like, bool) or isinstance(value, bool):
            return isinstance(value, bool) == isinstance(like, bool)
        if isinstance(like, float):
            return isinstance(value, (int, float))
        return isinstance(value, type(like))
    bad = [k for k, v in stored.items() if k in current and not same_kind(v, current[k])]
    counters = {"epoch": int, "step": int, "batch_in_epoch": int, "bad_epochs": int,
                "loss_count": int, "loss_sum": (int, float), "best_val": (int, float)}
    bad += [f"state {k}" for k, t in counters.items()
            if not isinstance(state.get(k), t) or isinstance(state.get(k), bool)]
    if bad:
        fail(f"{path} is damaged: its {', '.join(bad)} have the wrong type; it cannot be resumed")


# Settings a run started with --init-from takes from that model: its network and its process
NETWORK_ARGS = ("preset", "image_size", "hidden_dims", "time_dim", "self_cond")
PROCESS_ARGS = ("timesteps", "schedule", "prediction")


def load_init(args, kind):
    """--init-from: read the model a new run starts from, and take its network and process
    settings into args (a flag that contradicts them is refused). Returns the checkpoint, or
    None without --init-from."""
    if not args.init_from or (args.resume and "init_from" not in args.explicit):
        return None  # a resumed run has its weights already, from its own checkpoint
    if args.resume:
        fail("--init-from starts a new run from a model's weights and --resume continues a run; "
             "give one of them")
    init = common.load_checkpoint(args.init_from, kind)
    if common.distilled_steps(init):
        fail(f"{args.init_from} is a distilled student (distill.py); start from its teacher instead")
    taken = {k: init["diffusion"][k] for k in PROCESS_ARGS}
    taken.update({k: init["args"][k] for k in NETWORK_ARGS if k in init["args"] and hasattr(args, k)})
    clash = {k: v for k, v in taken.items() if k in args.explicit and getattr(args, k) != v}
    if clash:
        fail(f"{args.init_from} has " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in clash.items())
             + ": a run started from it keeps its network and process; drop the flag(s) that differ")
    for k, v in taken.items():
        setattr(args, k, v)
    if init["model_config"].get("num_classes"):
        args.class_cond = True  # a class-conditional network is trained with labels
    return init


def prepare_args(args, kind):
    """Check the arguments. With --resume, every setting comes from the checkpoint except the
    flags the command line gave (args.explicit): those are applied and named, and one that a
    resumed run cannot change (FIXED_ON_RESUME) is refused. With --init-from, the network and
    process settings come from that model (load_init), before the checks that depend on them.
    Returns (args, checkpoint to resume or None, model to start from or None)."""
    ckpt = None
    if args.resume:
        ckpt = common.load_checkpoint(args.resume, kind)
        for key in ("args", "optimizer", "state", "rng"):
            if not isinstance(ckpt.get(key), (dict, list)):
                fail(f"{args.resume} cannot be resumed: it lacks the training state {key!r} "
                     f"(a shipped, weights-only model can be sampled from, not trained on)")
        given = {k: getattr(args, k) for k in args.explicit if k != "resume"}
        stored = {**ckpt["args"], **ckpt["diffusion"]}
        check_stored_types(stored, vars(args), ckpt["state"], args.resume)
        changed = {k: v for k, v in given.items() if k in FIXED_ON_RESUME and stored.get(k, v) != v}
        if changed:
            fail("a resumed run keeps its " + ", ".join(
                f"--{k.replace('_', '-')} ({stored[k]}, not {v})" for k, v in changed.items()) +
                "; start a new run (another --out-dir) to change it")
        merged = {**vars(args), **stored, **given, "resume": args.resume, "explicit": args.explicit}
        merged["out_dir"] = given.get("out_dir")  # by default the checkpoint's own folder
        merged["overwrite"] = given.get("overwrite", False)
        args = argparse.Namespace(**merged)
        applied = [f"--{k.replace('_', '-')} {v}" for k, v in given.items()
                   if k not in ("out_dir", "device") and k not in FIXED_ON_RESUME]
        if applied:
            print(f"resuming with the checkpoint's settings, except from the command line: "
                  f"{', '.join(applied)}")
    init = load_init(args, kind)
    if args.out_dir is None:
        args.out_dir = str(Path(args.resume).parent) if args.resume else DEFAULT_OUT_DIRS[kind]
    check_training_args(args)
    check_out_dir(args)
    return args, ckpt, init
