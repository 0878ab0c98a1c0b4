"""Train the CIFAR-10 diffusion model (diffusion_cifar.py). Example: python train_diffusion_cifar.py --max-minutes 60

Two recipes; any flag given on the command line overrides its recipe's setting.
- cpu (the default): what trains best in an hour on 2 CPU cores in float32 (README, CIFAR-10):
  the 1.5M-parameter cpu preset, and MNIST's departures from the paper (cosine schedule,
  v-prediction, timesteps with density ~ t, a high learning rate with a short warmup and a
  cosine decay over the budget, a shorter EMA).
- paper: the DDPM paper's recipe (Appendix B) for GPUs: the 35.7M ddpm preset, Adam at 2e-4
  after 5,000 warmup steps, EMA 0.9999, batch 128, the linear schedule, eps-prediction.
Both flip images left-right at random. Same outputs as train_diffusion.py.
Many GPUs: torchrun --nproc_per_node=8 train_diffusion_cifar.py --recipe paper --amp bf16
(--batch-size is per process).
"""

import argparse

import torch

import common
import diffusion_cifar
import train_args
import training

RECIPES = {  # the first one is the default
    "cpu": dict(preset="cpu", batch_size=64, lr=1e-3, warmup=200, ema_decay=0.9995,
                schedule="cosine", prediction="v", t_power=2.0, lr_schedule="cosine",
                epochs=50, patience=5, grad_clip=1.0),
    "paper": dict(preset="ddpm", batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999,
                  schedule="linear", prediction="eps", t_power=1.0, lr_schedule="constant",
                  epochs=2000, patience=20, grad_clip=1.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--recipe", choices=list(RECIPES), default="cpu",
                   help="the settings every other default comes from (--help --recipe paper "
                        "shows the paper's). " + train_args.recipe_help(RECIPES))
    p.add_argument("--dataset", default="cifar10", help="cifar10, or a folder of images (RGB)")
    p.add_argument("--preset", choices=sorted(diffusion_cifar.PRESETS),
                   help="network size: ddpm is the paper's 35.7M network, cpu the CPU recipe's 1.5M")
    p.add_argument("--image-size", type=int, default=32, help="images are resized to this (folders)")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--no-flip", action="store_true", help="turn off random horizontal flips")
    train_args.add_training_args(p, "cifar")
    return train_args.parse(p, RECIPES, argv)


def random_hflip(x, generator=None):
    """Flip each image left-right with probability 1/2 (DDPM Appendix B)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator) < 0.5
    return torch.where(flip, x.flip(3), x)


def main(args):
    args, ckpt, init = train_args.prepare_args(args, "cifar")
    if ckpt is not None or init is not None:  # resuming, or fine-tuning: that model's network
        model_config = dict((ckpt or init)["model_config"])
    else:
        model_config = dict(diffusion_cifar.PRESETS[args.preset], image_size=args.image_size)
        model_config["channel_mult"] = list(model_config["channel_mult"])
        model_config["attn_resolutions"] = list(model_config["attn_resolutions"])
        levels = len(model_config["channel_mult"])
        common.check_range("image_size", args.image_size, 4, common.LIMITS["image_size"])
        if args.image_size < 4 or args.image_size % 2 ** (levels - 1):
            common.fail(f"--image-size {args.image_size} must be divisible by {2 ** (levels - 1)} "
                        f"for the {args.preset} preset's {levels} levels")
    if ckpt is None and args.dropout is not None:
        if not 0 <= args.dropout < 1:  # NaN fails this too
            common.fail(f"--dropout must be in [0, 1), got {args.dropout}")
        model_config["dropout"] = args.dropout
    data = common.load_dataset(args.dataset, args.data_dir, model_config["image_size"], channels=3)
    if args.class_cond and ckpt is None and not model_config.get("num_classes"):
        model_config["num_classes"] = data.num_classes
    augment = None if args.no_flip else random_hflip
    return training.train(args, "cifar", diffusion_cifar, model_config, data, augment=augment, ckpt=ckpt,
                          init=init)


if __name__ == "__main__":
    common.run(main, parse_args)
