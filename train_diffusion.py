"""Train the MNIST diffusion model (diffusion.py). Example: python train_diffusion.py --max-minutes 10

Two recipes; any flag given on the command line overrides its recipe's setting.
- ddpm: the DDPM paper's algorithm (Ho et al. 2020, Alg. 1) on the small U-Net: eps-prediction,
  uniform timesteps, AdamW at a constant rate after warmup, the usual targets. The one
  departure: the cosine noise schedule (Nichol & Dhariwal 2021), which this model has always used.
- fast (the default): what trains best in 10 minutes on 2 CPU cores. It adds six improvements,
  each a named piece with its own switch: v-prediction (--prediction), timesteps with density ~ t
  (--t-power), a cosine learning-rate decay over the budget (--lr-schedule), self-conditioning
  (--self-cond), stable targets (--reference-size) and the Muon optimizer (--optimizer).
Writes last.pt, best.pt, metrics.csv, loss_curve.png, progress.png, samples_epochNNN.png and
samples.png under --out-dir.
"""

import argparse

import common
import diffusion
import train_args
import training

RECIPES = {  # the first one is the default
    "fast": dict(batch_size=64, lr=3e-3, warmup=200, ema_decay=0.9995, schedule="cosine",
                 prediction="v", t_power=2.0, lr_schedule="cosine", optimizer="muon",
                 self_cond=True, reference_size=2048, epochs=50, patience=5),
    "ddpm": dict(batch_size=64, lr=1e-3, warmup=200, ema_decay=0.9995, schedule="cosine",
                 prediction="eps", t_power=1.0, lr_schedule="constant", optimizer="adamw",
                 self_cond=False, reference_size=0, epochs=50, patience=5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--recipe", choices=list(RECIPES), default="fast",
                   help="the settings every other default comes from (--help --recipe ddpm shows "
                        "that recipe's). " + train_args.recipe_help(RECIPES))
    p.add_argument("--dataset", default="mnist",
                   help="mnist, fashion-mnist, or a folder of images (your own data set)")
    p.add_argument("--image-size", type=int, default=28,
                   help="images are resized to this (folders)")
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[16, 32, 64],
                   help="U-Net width at each resolution, 28 -> 14 -> 7")
    p.add_argument("--time-dim", type=int, default=128,
                   help="width of the time embedding, even")
    p.add_argument("--self-cond", action=argparse.BooleanOptionalAction,
                   help="self-conditioning: the network also sees its own x0 estimate, from a "
                        "first call on half the batches in training and from the previous step "
                        "in sampling (Chen et al. 2022; diffusion.SelfConditionedDiffusion)")
    p.add_argument("--reference-size", type=int,
                   help="stable targets (Xu et al. 2023; diffusion.stable_targets): each training "
                        "target is built from E[x0 | x_t] over the batch and this many random "
                        "training images, drawn for every batch; 0: the usual target")
    train_args.add_training_args(p, "mnist")
    return train_args.parse(p, RECIPES, argv)


def check_network(args):
    """Widths and embedding sizes that the U-Net cannot be built with, as clear errors."""
    dims = args.hidden_dims
    if args.image_size < 4 or any(h < 1 for h in dims) or args.time_dim < 2:
        common.fail("--image-size must be >= 4 and --hidden-dims, --time-dim positive")
    common.check_range("image_size", args.image_size, 4, common.LIMITS["image_size"])
    common.check_range("time_dim", args.time_dim, 2, common.LIMITS["time_dim"])
    if len(dims) > common.LIMITS["levels"] or max(dims) > common.LIMITS["width"]:
        common.fail(f"--hidden-dims: at most {common.LIMITS['levels']} levels of at most "
                    f"{common.LIMITS['width']} channels, got {dims}")
    if args.time_dim % 2:
        common.fail(f"--time-dim must be even (sines and cosines in pairs), got {args.time_dim}")
    if any(h > 8 and h % 8 for h in dims):
        common.fail(f"--hidden-dims {' '.join(map(str, dims))}: each width must be a multiple of 8, "
                    f"or at most 8 (GroupNorm normalizes groups of 8 channels)")
    if dims[-1] % 4:
        common.fail(f"--hidden-dims: the last width ({dims[-1]}) must be a multiple of 4, the "
                    f"number of attention heads in the bottleneck")
    if args.reference_size < 0:
        common.fail(f"--reference-size must be 0 (off) or a number of images, got {args.reference_size}")
    common.check_range("reference_size", args.reference_size, 0, common.LIMITS["reference_size"])
    if args.image_size % 2 ** (len(dims) - 1):
        common.fail(f"--image-size {args.image_size} must be divisible by {2 ** (len(dims) - 1)} "
                    f"for {len(dims)} levels")


def main(args):
    args, ckpt, init = train_args.prepare_args(args, "mnist")
    if ckpt is not None or init is not None:
        model_config = dict((ckpt or init)["model_config"])
    else:
        check_network(args)
        model_config = dict(image_size=args.image_size, channels=1, hidden_dims=list(args.hidden_dims),
                            time_dim=args.time_dim, num_classes=None, self_cond=args.self_cond)
    data = common.load_dataset(args.dataset, args.data_dir, model_config["image_size"], channels=1)
    if args.class_cond and model_config["num_classes"] is None and ckpt is None:
        model_config["num_classes"] = data.num_classes
    return training.train(args, "mnist", diffusion, model_config, data, ckpt=ckpt, init=init)


if __name__ == "__main__":
    common.run(main, parse_args)
