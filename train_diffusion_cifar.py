"""Train the CIFAR-10 diffusion model (diffusion_cifar.py). Example: python train_diffusion_cifar.py --preset small

The DDPM paper's recipe: Adam at 2e-4 with warmup, gradient clipping at 1, EMA 0.9999, random
horizontal flips, batch 128, the linear schedule. Same outputs as train_diffusion.py.
Many GPUs: torchrun --nproc_per_node=8 train_diffusion_cifar.py --preset ddpm --amp bf16
(--batch-size is per process).
"""

import argparse

import torch

import common
import diffusion_cifar
import training


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--dataset", default="cifar10", help="cifar10, or a folder of images (RGB)")
    p.add_argument("--preset", choices=sorted(diffusion_cifar.PRESETS), default="small",
                   help="network size: ddpm is the paper's 35.7M network")
    p.add_argument("--image-size", type=int, default=32, help="images are resized to this (folders)")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--no-flip", action="store_true", help="turn off random horizontal flips")
    training.add_training_args(p, "cifar")
    p.set_defaults(batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999, schedule="linear",
                   epochs=2000, patience=20, grad_clip=1.0)
    return p.parse_args(argv)


def random_hflip(x):
    """Flip each image left-right with probability 1/2 (DDPM Appendix B)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def main(args):
    cli = args
    args, ckpt = training.prepare_args(args, "cifar")
    if ckpt is not None:
        model_config = ckpt["model_config"]
        defaults = vars(parse_args([]))
        training.note_ignored_architecture(ckpt, {k: getattr(cli, k) for k in ("image_size", "dropout")
                                                  if getattr(cli, k) != defaults[k]})
    else:
        model_config = dict(diffusion_cifar.PRESETS[args.preset], image_size=args.image_size)
        model_config["channel_mult"] = list(model_config["channel_mult"])
        model_config["attn_resolutions"] = list(model_config["attn_resolutions"])
        if args.dropout is not None:
            if not 0 <= args.dropout < 1:  # NaN fails this too
                common.fail(f"--dropout must be in [0, 1), got {args.dropout}")
            model_config["dropout"] = args.dropout
        levels = len(model_config["channel_mult"])
        if args.image_size < 4 or args.image_size % 2 ** (levels - 1):
            common.fail(f"--image-size {args.image_size} must be divisible by {2 ** (levels - 1)} "
                        f"for the {args.preset} preset's {levels} levels")
    data = common.load_dataset(args.dataset, args.data_dir, model_config["image_size"], channels=3)
    if args.class_cond and ckpt is None:
        model_config["num_classes"] = data.num_classes
    augment = None if args.no_flip else random_hflip
    return training.train(args, "cifar", diffusion_cifar, model_config, data, augment=augment, ckpt=ckpt)


if __name__ == "__main__":
    main(parse_args())
