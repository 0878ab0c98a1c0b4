"""Train the MNIST diffusion model (diffusion.py). Example: python train_diffusion.py --max-minutes 10

Writes last.pt, best.pt, metrics.csv, loss_curve.png, progress.png, samples_epochNNN.png and samples.png
under --out-dir. The defaults below (shown as this script uses them) give digits after 10
minutes on a 2-core CPU; they depart from the DDPM paper in seven places, each named in the
README: the cosine schedule, v-prediction, training timesteps with density ~ t (--t-power 2),
a high learning rate with a cosine decay over the budget, self-conditioning (the network also
sees its own estimate of x0; --no-self-cond turns it off), stable targets (the target is
built from E[x0 | x_t] over 2,048 reference images; --reference-size 0 turns them off), and
the Muon optimizer for the weight matrices (training.Muon; --optimizer adamw for AdamW
alone). The network itself is smaller than DDPM's and normalizes groups of 8 channels
(diffusion.py, group_norm).
"""

import argparse

import common
import diffusion
import training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--dataset", default="mnist",
                   help="mnist, fashion-mnist, or a folder of images (your own data set)")
    p.add_argument("--image-size", type=int, default=28,
                   help="images are resized to this (folders)")
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[16, 32, 64],
                   help="U-Net width at each resolution, 28 -> 14 -> 7")
    p.add_argument("--time-dim", type=int, default=128,
                   help="width of the time embedding, even")
    p.add_argument("--patch-size", type=int, default=1,
                   help="pixel-unshuffle stem: the U-Net runs on patch x patch blocks of pixels "
                        "stacked as channels (2: 28x28x1 -> 14x14x4)")
    p.add_argument("--self-cond", action=argparse.BooleanOptionalAction, default=True,
                   help="self-conditioning: the network also sees its own x0 estimate, from a "
                        "first call on half the batches in training and from the previous step "
                        "in sampling (Chen et al. 2022)")
    p.add_argument("--reference-size", type=int, default=2048,
                   help="stable targets (Xu et al. 2023): each training target is built from "
                        "E[x0 | x_t] over the batch's own image and this many random training "
                        "images, drawn for every batch; 0: the usual target, from the image alone")
    training.add_training_args(p, "mnist")
    # defaults chosen for "digits in 10 minutes on 2 CPU cores" (README, Results)
    p.set_defaults(batch_size=64, lr=3e-3, warmup=200, ema_decay=0.9995, schedule="cosine",
                   prediction="v", t_power=2.0, lr_schedule="cosine", epochs=50, patience=5,
                   optimizer="muon")
    return p.parse_args(argv)


def check_network(args):
    """Widths and embedding sizes that the U-Net cannot be built with, as clear errors."""
    dims = args.hidden_dims
    if args.image_size < 4 or any(h < 1 for h in dims) or args.time_dim < 2:
        common.fail("--image-size must be >= 4 and --hidden-dims, --time-dim positive")
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
    if args.patch_size < 1:
        common.fail(f"--patch-size must be at least 1, got {args.patch_size}")
    if args.image_size % (args.patch_size * 2 ** (len(dims) - 1)):
        common.fail(f"--image-size {args.image_size} must be divisible by "
                    f"{args.patch_size * 2 ** (len(dims) - 1)} for --patch-size {args.patch_size} "
                    f"and {len(dims)} levels")


def main(args):
    cli = args
    args, ckpt = training.prepare_args(args, "mnist")
    if ckpt is not None:
        model_config = ckpt["model_config"]
        defaults = vars(parse_args([]))
        training.note_ignored_architecture(ckpt, {k: getattr(cli, k) for k in ("hidden_dims", "time_dim", "image_size", "patch_size", "self_cond")
                                                  if getattr(cli, k) != defaults[k]})
    else:
        check_network(args)
        model_config = dict(image_size=args.image_size, channels=1, hidden_dims=list(args.hidden_dims),
                            time_dim=args.time_dim, num_classes=None, adaptive_norm=True,
                            patch_size=args.patch_size, self_cond=args.self_cond)
    data = common.load_dataset(args.dataset, args.data_dir, model_config["image_size"], channels=1)
    if args.class_cond and model_config["num_classes"] is None and ckpt is None:
        model_config["num_classes"] = data.num_classes
    return training.train(args, "mnist", diffusion, model_config, data, ckpt=ckpt)


if __name__ == "__main__":
    main(parse_args())
