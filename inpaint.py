"""Use a trained model on an image: fill in its unknown part (inpainting), or redraw it (SDEdit).

Example: python inpaint.py --checkpoint runs/mnist/last.pt --mask right

Both rest on two facts. A trained model denoises any x_t, whatever image it came from; and
Eq. 4, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, makes an x_t from any image in one draw.
- Inpainting by replacement: sample as usual, but after every step put the known pixels back,
  drawn from q(x_t | x_0) at the step's noise level (Eq. 4), so that the model fills in only
  the rest and sees the known part at the noise level it expects. --resample U adds RePaint's
  resampling (Lugmayr et al. 2022, arXiv:2201.09865, Alg. 1): after each step, go back to the
  step's start with fresh noise, q(x_t | x_prev), and come down again, U times in all, so the
  filled part can agree with the known part across the seam.
- SDEdit (Meng et al. 2022, arXiv:2108.01073): noise the image to t = strength x (T - 1) with
  Eq. 4, then sample down from there. Strength 0 returns the image, strength 1 is plain
  sampling; in between, the model keeps the image's layout and redraws its details.
Writes inpaint.png (original | masked | completions, a row per image) or sdedit.png (a column
per strength), and with --out-npz the completions (arr_0, uint8 N x H x W x C, as evaluate.py
reads) beside the originals and the mask.
"""

import argparse
import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

import common
import diffusion as mnist_module  # ddim_timesteps, the same in both model modules

MASKS = ("bottom", "right", "center", "random")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint from either training script")
    p.add_argument("--mode", choices=["inpaint", "sdedit"], default="inpaint")
    p.add_argument("--mask", default="right",
                   help="the unknown part: bottom, right (half), center (square), random (pixels), "
                        "or a PNG of the image's size, white where the pixels are known")
    p.add_argument("--indices", type=int, nargs="+", default=None, help="test-set images (default: the first --count)")
    p.add_argument("--count", type=int, default=8, help="without --indices: the first this many test images")
    p.add_argument("--image", default=None, help="an image file of your own instead of --indices")
    p.add_argument("--samples", type=int, default=4, help="completions per image")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (ddpm takes all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta, in [0, 1]")
    p.add_argument("--resample", type=int, default=1,
                   help="RePaint: each step is taken this many times, going back with fresh noise "
                        "in between; 1: plain replacement")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="SDEdit: the noise level to start from, as a share of T")
    p.add_argument("--class", dest="class_id", type=int, default=None,
                   help="conditional models: the class to fill in with (default: the image's own)")
    p.add_argument("--guidance", type=float, default=None, help="default: the training setting")
    p.add_argument("--data-dir", default="./data", help=common.DATA_DIR_HELP)
    p.add_argument("--out-npz", default=None, help="also save the completions here (.npz)")
    p.add_argument("--classifier", default=None,
                   help="score the completions: the share that this classifier (evaluate.py "
                        "train-classifier) assigns to the original image's class")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=common.seed_arg, default=0, help="random seed")
    p.add_argument("--out-dir", default="runs/inpaint", help="where the grid goes")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# Masks and images


def make_mask(name, size, generator=None):
    """(1, 1, size, size), 1 where the pixel is known. A file: white (>= 128) is known."""
    mask = torch.ones(1, 1, size, size)
    if name == "bottom":
        mask[..., size // 2:, :] = 0
    elif name == "right":
        mask[..., size // 2:] = 0
    elif name == "center":
        q = size // 4
        mask[..., q:size - q, q:size - q] = 0
    elif name == "random":
        mask = (torch.rand(1, 1, size, size, generator=generator) < 0.5).float()
    else:
        mask = torch.from_numpy(read_image(name, 1, size) >= 128).float()[None]
    if mask.all() or not mask.any():
        common.fail(f"the mask {name!r} must leave some pixels known and some unknown")
    return mask


def read_image(path, channels, size):
    """An image file as uint8 (C, H, W); it must already have the model's size and channels."""
    from PIL import Image
    path = Path(path)
    if not path.is_file():
        common.fail(f"{path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            mode, shape = im.mode, im.size
            a = np.asarray(im.convert("L" if channels == 1 else "RGB"), np.uint8)
    except (OSError, Image.DecompressionBombError) as e:
        common.fail(f"could not read {path}: {e}")
    if shape != (size, size):
        common.fail(f"{path} is {shape[0]} x {shape[1]}; this model works on {size} x {size} images")
    if channels == 3 and mode in ("L", "1", "LA", "I", "I;16"):
        common.fail(f"{path} is a grey image; this model works on colour (RGB) images")
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------
# The two uses of a trained denoiser


def known_at(diffusion, x0, t, generator):
    """The known image at code timestep t, drawn from q(x_t | x_0) (DDPM Eq. 4); x0 at t = -1."""
    if t < 0:
        return x0
    tt = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
    return diffusion.q_sample(x0, tt, diffusion._randn(x0.shape, generator, x0.device))


def step(diffusion, x, t, t_prev, sampler, eta, y, guidance, generator):
    """One sampler step from t to t_prev: DDPM Alg. 2 (t_prev = t - 1) or DDIM Eq. 12."""
    if sampler == "ddpm":
        return diffusion.ddpm_step(x, t, y, guidance, generator=generator)[0]
    return diffusion.ddim_step(x, t, t_prev, eta, y, guidance, generator=generator)[0]


def timesteps(diffusion, sampler, steps, t_start):
    """The descending timesteps from t_start to 0: every one for DDPM, `steps` evenly spaced
    (at most t_start + 1) for DDIM: DDIM's sub-sequence of a process t_start + 1 steps long."""
    if sampler == "ddpm":
        return list(range(t_start, -1, -1))
    return mnist_module.ddim_timesteps(t_start + 1, min(steps, t_start + 1))


@torch.no_grad()
def inpaint(diffusion, x0, mask, sampler="ddim", steps=50, eta=0.0, y=None, guidance=1.0,
            resample=1, generator=None, noise=None):
    """Fill in where mask = 0, keeping x0 where mask = 1 (replacement; RePaint with resample > 1)."""
    device = diffusion.betas.device
    x0, mask = x0.to(device), mask.to(device)
    seq = timesteps(diffusion, sampler, steps, diffusion.num_timesteps - 1)
    x = noise.to(device) if noise is not None else diffusion._randn(x0.shape, generator, device)
    x = mask * known_at(diffusion, x0, seq[0], generator) + (1 - mask) * x
    with getattr(diffusion, "chain", contextlib.nullcontext)():  # self-conditioning's memory
        for i, t in enumerate(seq):
            t_prev = seq[i + 1] if i + 1 < len(seq) else -1
            for r in range(resample):
                x_prev = step(diffusion, x, t, t_prev, sampler, eta, y, guidance, generator)
                x_prev = mask * known_at(diffusion, x0, t_prev, generator) + (1 - mask) * x_prev
                if r + 1 == resample or t_prev < 0:  # the last step lands on x0: nothing to redo
                    break
                # RePaint: back to t with fresh noise, q(x_t | x_prev) = N(sqrt(a) x_prev, (1 - a) I)
                a = diffusion._alpha_bar(t) / diffusion._alpha_bar(t_prev)
                x = math.sqrt(a) * x_prev + math.sqrt(1 - a) * diffusion._randn(x.shape, generator, device)
            x = x_prev
    return common.check_images_finite(x.clamp(-1, 1), "inpainting")


@torch.no_grad()
def seam_jump(images, mask):
    """How sharply an image changes across the mask's edge: the mean |difference|, in grey levels
    of 255, between neighbouring pixels (left-right and up-down) of which one is known and the
    other filled in. A completion that does not join its known part jumps more than the
    original image does at the same places. images (N, C, H, W) in [-1, 1], mask (1, 1, H, W)."""
    x, m = (images.float() + 1) * 127.5, mask.bool()
    jumps = []
    for dim in (-1, -2):  # neighbours along x, then along y
        n = x.shape[dim] - 1
        a, b = x.narrow(dim, 0, n), x.narrow(dim, 1, n)
        edge = m.narrow(dim, 0, n) != m.narrow(dim, 1, n)
        jumps.append((a - b).abs()[edge.expand_as(a)])
    jumps = torch.cat(jumps)
    return jumps.mean().item() if len(jumps) else 0.0


def sdedit(diffusion, x0, strength, steps=50, eta=0.0, y=None, guidance=1.0, generator=None, noise=None):
    """Noise x0 to t0 = strength (T - 1) with Eq. 4, then DDIM down to x0 in about strength x
    `steps` steps. strength 0: x0 itself. The noise of Eq. 4 is `noise` when given."""
    device = diffusion.betas.device
    x0 = x0.to(device)
    if strength == 0:
        return x0.clamp(-1, 1)
    t0 = round(strength * (diffusion.num_timesteps - 1))
    seq = timesteps(diffusion, "ddim", max(1, round(strength * steps)), t0)
    eps = noise.to(device) if noise is not None else diffusion._randn(x0.shape, generator, device)
    tt = torch.full((len(x0),), t0, device=device, dtype=torch.long)
    x = diffusion.q_sample(x0, tt, eps)  # DDPM Eq. 4
    with getattr(diffusion, "chain", contextlib.nullcontext)():
        for i, t in enumerate(seq):
            t_prev = seq[i + 1] if i + 1 < len(seq) else -1
            x = step(diffusion, x, t, t_prev, "ddim", eta, y, guidance, generator)
    return common.check_images_finite(x.clamp(-1, 1), "SDEdit")


# ----------------------------------------------------------------------------------------


def check_args(args, T):
    if not 0 <= args.eta <= 1:
        common.fail(f"--eta must be in [0, 1], got {args.eta}")
    if not 1 <= args.steps <= T:
        common.fail(f"--steps must be in [1, {T}] for this checkpoint, got {args.steps}")
    common.check_range("samples", args.samples, 1, 64)
    common.check_range("resample", args.resample, 1, 100)
    if any(not 0 <= s <= 1 for s in args.strengths):  # NaN fails this too
        common.fail(f"--strengths must be in [0, 1], got {args.strengths}")
    common.check_range("count", args.count, 1, 100_000)
    if args.indices is None:
        args.indices = list(range(args.count))


def main(args):
    device = common.pick_device(args.device)
    ckpt = common.load_checkpoint(args.checkpoint)
    common.refuse_student(ckpt, args.checkpoint, "puts the known pixels back at every step of its own loop")
    cfg = ckpt["model_config"]
    T = ckpt["diffusion"]["timesteps"]
    check_args(args, T)
    common.check_finite(guidance=args.guidance)
    out_dir = common.check_writable_dir(args.out_dir)
    if args.classifier and args.image:
        common.fail("--classifier scores against the test images' own labels; it needs --indices or --count, not --image")
    common.check_writable_file(args.out_npz, "--out-npz", (".npz",))
    g = torch.Generator().manual_seed(args.seed)
    size, channels = cfg["image_size"], cfg["channels"]
    mask = make_mask(args.mask, size, g) if args.mode == "inpaint" else None
    if mask is not None and mask.shape[1] != 1:
        common.fail("a mask has one channel")
    num_classes = cfg.get("num_classes")
    if args.class_id is not None and not (num_classes and 0 <= args.class_id < num_classes):
        common.fail(f"--class needs a class-conditional checkpoint and a class in [0, {num_classes or 0})")
    labels = None
    if args.image:
        images = torch.from_numpy(read_image(args.image, channels, size).copy())[None]
    else:
        dataset = ckpt.get("args", {}).get("dataset", "mnist")
        split = "test" if dataset in ("mnist", "fashion-mnist", "cifar10") else "train"
        data = common.load_dataset(dataset, args.data_dir, size, channels, split=split)
        if max(args.indices) >= len(data.images) or min(args.indices) < 0:
            common.fail(f"--indices must be in [0, {len(data.images)})")
        images = data.images[args.indices]
        labels = data.labels[args.indices] if data.labels is not None else None
    clf = None
    if args.classifier:  # before the work: a missing classifier must not cost minutes
        import evaluate
        clf, _ = evaluate.load_classifier(args.classifier, dataset, device)
        if labels is None:
            common.fail("--classifier needs a labelled test set")
    model, diffusion, _ = common.model_from_checkpoint(ckpt, device)
    guidance = ckpt.get("args", {}).get("guidance", 1.0) if args.guidance is None else args.guidance
    x0 = common.to_model_range(images).float()
    y = None
    if num_classes:  # the image's own class, or --class; without either, unconditional
        y = torch.full((len(x0),), args.class_id) if args.class_id is not None else labels
        y = y.to(device) if y is not None else None

    start = time.perf_counter()
    if args.mode == "inpaint":
        k = args.samples
        xs, ys = x0.repeat_interleave(k, 0), (y.repeat_interleave(k, 0) if y is not None else None)
        out = inpaint(diffusion, xs, mask, args.sampler, args.steps, args.eta, ys, guidance,
                      args.resample, g).cpu()
        shown = range(min(len(x0), 8))  # the figure shows the first 8 images
        rows = [[x0[i], x0[i] * mask[0], *out[i * k:(i + 1) * k]] for i in shown]  # unknown: grey
        common.image_rows_figure(rows, [f"image {i}" for i in shown], out_dir / "inpaint.png",
                                 f"original | masked ({args.mask}) | {k} completions, "
                                 f"{common.sampler_label(args.sampler, args.steps if args.sampler == 'ddim' else T, args.eta)}"
                                 + (f", RePaint x{args.resample}" if args.resample > 1 else ""))
        written = "inpaint.png"
        seam = {"completions": seam_jump(out, mask), "originals": seam_jump(x0, mask)}
        print(f"across the mask's edge neighbouring pixels differ by {seam['completions']:.1f} grey "
              f"levels in the completions, {seam['originals']:.1f} in the originals (seam_jump)")
    else:
        noise = diffusion._randn(x0.shape, g, device)  # the same noise at every strength
        outs = [sdedit(diffusion, x0, s, args.steps, args.eta, y, guidance, g, noise).cpu() for s in args.strengths]
        out = torch.stack(outs, 1).flatten(0, 1)  # (images x strengths, C, H, W)
        n = len(args.strengths)
        shown = range(min(len(x0), 8))
        rows = [list(out[i * n:(i + 1) * n]) for i in shown]
        common.image_rows_figure(rows, [f"image {i}" for i in shown], out_dir / "sdedit.png",
                                 "SDEdit strengths " + ", ".join(f"{s:g}" for s in args.strengths)
                                 + ": noised to t = strength x T, then denoised")
        written = "sdedit.png"
    seconds = time.perf_counter() - start
    if args.out_npz:
        np.savez(args.out_npz, arr_0=common.to_uint8(out).permute(0, 2, 3, 1).numpy(),
                 originals=images.permute(0, 2, 3, 1).numpy(),
                 mask=(mask[0, 0].numpy() > 0) if mask is not None else np.zeros(0, bool))
    report = {"images": out, "seconds": seconds}
    if args.mode == "inpaint":
        report["seam"] = seam
    if clf is not None and args.mode == "inpaint":
        import evaluate
        _, probs = evaluate.classify(clf, common.to_uint8(out).permute(0, 2, 3, 1).numpy(), device)
        report["same_class"] = float((probs.argmax(1) == labels.repeat_interleave(args.samples).numpy()).mean())
        print(f"the classifier assigns {100 * report['same_class']:.1f}% of the {len(out)} completions "
              f"to the original image's class")
    print(f"wrote {out_dir / written}{' and ' + args.out_npz if args.out_npz else ''} "
          f"({len(out)} images in {seconds:.1f} s)")
    return report


if __name__ == "__main__":
    common.run(main, parse_args)
