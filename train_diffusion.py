"""Train the MNIST diffusion model (diffusion.py). Example: python train_diffusion.py --max-minutes 10

Writes last.pt, best.pt, metrics.csv, loss_curve.png, samples_epochNNN.png and samples.png
under --out-dir. The defaults give digits after 10 minutes on a 2-core CPU (see README).
"""

import argparse

import common
import diffusion


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist",
                   help="mnist, fashion-mnist, or a folder of images (your own data set)")
    p.add_argument("--image-size", type=int, default=28, help="images are resized to this (folders)")
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[16, 32, 64],
                   help="U-Net width at each resolution")
    p.add_argument("--time-dim", type=int, default=128, help="width of the time embedding")
    p.add_argument("--out-dir", default="runs/mnist")
    common.add_training_args(p)
    # defaults chosen for "digits in 10 minutes on 2 CPU cores" (README, Results); the same
    # settings keep improving with longer runs (20 CPU minutes: 85.6% confident samples)
    p.set_defaults(batch_size=64, lr=2e-3, warmup=200, ema_decay=0.9995, schedule="cosine",
                   prediction="v", t_power=2.0, lr_schedule="cosine", epochs=50, patience=5)
    return p.parse_args(argv)


def main(args):
    args, ckpt = common.prepare_args(args, "mnist")
    if ckpt is not None:
        model_config = ckpt["model_config"]
    else:
        if args.image_size < 4 or any(h < 1 for h in args.hidden_dims) or args.time_dim < 2:
            common.fail("--image-size must be >= 4 and --hidden-dims, --time-dim positive")
        if args.image_size % 2 ** (len(args.hidden_dims) - 1):
            common.fail(f"--image-size {args.image_size} must be divisible by "
                        f"{2 ** (len(args.hidden_dims) - 1)} for {len(args.hidden_dims)} levels")
        model_config = dict(image_size=args.image_size, channels=1, hidden_dims=list(args.hidden_dims),
                            time_dim=args.time_dim, num_classes=None, adaptive_norm=True)
    data = common.load_dataset(args.dataset, args.data_dir, model_config["image_size"], channels=1)
    if args.class_cond and model_config["num_classes"] is None and ckpt is None:
        model_config["num_classes"] = data.num_classes
    return common.train(args, "mnist", diffusion, model_config, data, ckpt=ckpt)


if __name__ == "__main__":
    main(parse_args())
