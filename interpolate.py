"""Interpolate in the DDIM latent space x_T. Example: python interpolate.py --checkpoint runs/mnist/best.pt

Three experiments (--mode):
- noise:   between two noise seeds, spherical (slerp) against linear interpolation of x_T,
           decoded with deterministic DDIM (eta = 0). Linear midpoints have too small a norm
           (about sqrt(1/2) of a real x_T for independent seeds), so they decode to washed-out
           images; slerp keeps the norm. The figure shows both rows and the norms.
- images:  between two real test images: DDIM inversion to x_T, slerp, decode (DDIM Sec. 5.4).
- classes: conditional models only: fixed noise, the conditional noise prediction blended
           from one class to another.
Each writes a PNG grid and an animated GIF under --out-dir.
"""

import argparse
import math

import torch

import common


def slerp(a, b, w):
    """Spherical interpolation between tensors a and b (whole-sample angle), w in [0, 1]."""
    af, bf = a.flatten(), b.flatten()
    cos = torch.dot(af, bf) / (af.norm() * bf.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    if theta.abs() < 1e-4:  # nearly parallel: slerp and lerp agree
        return (1 - w) * a + w * b
    return (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)


def lerp(a, b, w):
    return (1 - w) * a + w * b


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint from either training script")
    p.add_argument("--mode", choices=["noise", "images", "classes", "all"], default="all", help="which experiment (all: noise, images, and classes if conditional)")
    p.add_argument("--frames", type=int, default=9, help="points along each path, ends included")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps for decoding and inversion (default 50; a distilled student's own count)")
    p.add_argument("--sampler", choices=["ddim", "dpm++"], default="ddim",
                   help="the deterministic decoder of modes noise and classes: DDIM (eta 0) or "
                        "DPM-Solver++ (try --steps 15); mode images always uses DDIM, whose "
                        "inversion it retraces")
    p.add_argument("--seeds", type=common.seed_arg, nargs=2, default=None, help="the two noise seeds (mode noise)")
    p.add_argument("--indices", type=int, nargs=2, default=[0, 1],
                   help="which test images to join (mode images)")
    p.add_argument("--classes", type=int, nargs=2, default=[1, 7], help="mode classes")
    p.add_argument("--data-dir", default="./data", help=common.DATA_DIR_HELP)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=common.seed_arg, default=0, help="random seed")
    p.add_argument("--out-dir", default="runs/interpolate", help="where the PNGs and GIFs go")
    return p.parse_args(argv)


def save_gif(frames, path, scale=4, ms=120):
    """frames: (N, C, H, W) in [-1, 1] -> an animated GIF that plays forward and back."""
    from PIL import Image
    arr = common.to_uint8(frames).permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in arr]
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    seq = images + images[-2:0:-1]
    seq[0].save(path, save_all=True, append_images=seq[1:], duration=ms, loop=0)


def decode(diffusion, xT, sampler, steps, y=None, guidance=1.0):
    """x_T -> image with a deterministic sampler: the same x_T always gives the same image."""
    return common.sample(diffusion, sampler, xT.shape, steps, 0.0, y, guidance, noise=xT)


def noise_mode(args, diffusion, shape, device, out_dir, y, guidance):
    seeds = args.seeds or [args.seed, args.seed + 1]
    a, b = (torch.randn(shape, generator=torch.Generator().manual_seed(s)).to(device) for s in seeds)
    ws = torch.linspace(0, 1, args.frames).tolist()
    paths = {"slerp": torch.cat([slerp(a, b, w) for w in ws]),
             "lerp": torch.cat([lerp(a, b, w) for w in ws])}
    yy = y.repeat(len(ws)) if y is not None else None
    decoded = {k: decode(diffusion, v, args.sampler, args.steps, yy, guidance) for k, v in paths.items()}
    expected = math.sqrt(a.numel())  # E||x_T|| for x_T ~ N(0, I) is about sqrt(D)
    norms = {k: (v.flatten(1).norm(dim=1) / expected).cpu().numpy() for k, v in paths.items()}

    def norm_plot(ax):
        ax.plot(ws, norms["slerp"], "o-", label="slerp")
        ax.plot(ws, norms["lerp"], "s-", label="linear")
        ax.axhline(1.0, color="k", ls=":", label="typical ||x_T|| of N(0, I)")
        ax.set_xlabel("interpolation weight w")
        ax.set_ylabel("||x_T|| / sqrt(D)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    common.image_rows_figure([decoded["slerp"], decoded["lerp"]], ["slerp", "linear"],
                             out_dir / "noise_interpolation.png",
           f"Between noise seeds {seeds[0]} and {seeds[1]}, decoded with "
           f"{common.sampler_label(args.sampler, args.steps)}", norm_plot)
    save_gif(decoded["slerp"], out_dir / "noise_interpolation.gif")
    mid = len(ws) // 2
    return {"seeds": seeds, "midpoint_norm_slerp": float(norms["slerp"][mid]),
            "midpoint_norm_lerp": float(norms["lerp"][mid])}


def load_images(args, ckpt):
    """The test images of --indices, loaded and checked before any mode writes a file."""
    dataset = ckpt.get("args", {}).get("dataset", "mnist")
    cfg = ckpt["model_config"]
    split = "test" if dataset in ("mnist", "fashion-mnist", "cifar10") else "train"
    data = common.load_dataset(dataset, args.data_dir, cfg["image_size"], cfg["channels"], split=split)
    if max(args.indices) >= len(data.images) or min(args.indices) < 0:
        common.fail(f"--indices must be in [0, {len(data.images)})")
    return data


def images_mode(args, diffusion, ckpt, data, device, out_dir):
    cfg = ckpt["model_config"]
    x0 = common.to_model_range(data.images[list(args.indices)]).to(device)
    yy = None
    if cfg.get("num_classes") and data.labels is not None:
        yy = data.labels[list(args.indices)].to(device)
    # invert each real image with its own label (or none), then slerp the two x_T
    xT = diffusion.ddim_invert(x0, steps=args.steps, y=yy, guidance=1.0)
    recon = common.check_images_finite(
        diffusion.ddim_sample(x0.shape, steps=args.steps, noise=xT, y=yy, guidance=1.0, clip_x0=False))
    ws = torch.linspace(0, 1, args.frames).tolist()
    path = torch.cat([slerp(xT[:1], xT[1:], w) for w in ws])
    y_path = None
    if yy is not None:  # the label switches half-way
        y_path = torch.tensor([int(yy[0]) if w < 0.5 else int(yy[1]) for w in ws], device=device)
    decoded = common.check_images_finite(
        diffusion.ddim_sample(path.shape, steps=args.steps, noise=path, y=y_path, guidance=1.0))
    ends = [x0[0]] + [None] * (len(ws) - 2) + [x0[1]]  # the real images above the path's ends
    common.image_rows_figure([ends, decoded], ["real", "slerp"], out_dir / "image_interpolation.png",
           f"Between test images {args.indices[0]} and {args.indices[1]} through DDIM inversion")
    save_gif(decoded, out_dir / "image_interpolation.gif")
    return {"indices": list(args.indices),
            "reconstruction_mae": float((recon.clamp(-1, 1) - x0).abs().mean() / 2)}


def classes_mode(args, diffusion, module, ckpt, shape, device, out_dir, guidance):
    cfg = ckpt["model_config"]
    num_classes = cfg.get("num_classes")
    if not num_classes:
        common.fail("--mode classes needs a class-conditional checkpoint (--class-cond)")
    model = diffusion.model
    c_a, c_b = args.classes
    ws = torch.linspace(0, 1, args.frames, device=device)

    def blended(x, t, y, **x0_self):
        """The label carries the frame index k: eps = (1 - w_k) eps(class a) + w_k eps(class b).
        The null label (-1, for guidance) passes through unchanged. A self-conditioned
        network's x0 estimate (the keyword x0_self) goes to both calls."""
        cond = y >= 0
        w = ws[y.clamp(min=0)].view(-1, 1, 1, 1)
        eps_a = model(x, t, torch.where(cond, c_a, y), **x0_self)
        eps_b = model(x, t, torch.where(cond, c_b, y), **x0_self)
        return torch.where(cond.view(-1, 1, 1, 1), (1 - w) * eps_a + w * eps_b, eps_a)

    n = len(ws)
    xT = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device).repeat(n, 1, 1, 1)
    blend = common.make_diffusion(module, blended, cfg, diffusion.num_timesteps, diffusion.schedule,
                                  diffusion.prediction, p_self_cond=1.0).to(device)
    frame = torch.arange(n, device=device)
    decoded = decode(blend, xT, args.sampler, args.steps, frame, guidance)
    common.image_rows_figure([decoded], [f"{c_a} -> {c_b}"], out_dir / "class_interpolation.png",
           f"Fixed noise, eps blended from class {c_a} to class {c_b} (guidance {guidance:g})")
    save_gif(decoded, out_dir / "class_interpolation.gif")
    return {"classes": [c_a, c_b]}


def main(args):
    device = common.pick_device(args.device)
    if args.frames < 2:
        common.fail("--frames must be at least 2")
    common.check_range("frames", args.frames, 2, common.LIMITS["frames"])
    ckpt = common.load_checkpoint(args.checkpoint)
    student_steps = common.distilled_steps(ckpt)
    if args.steps is None:
        args.steps = student_steps or 50
    if student_steps:  # a student decodes with its own steps, and cannot invert
        if args.mode == "images":
            common.refuse_student(ckpt, args.checkpoint, "inverts images with DDIM (mode images)")
        common.check_student(student_steps, args.sampler, args.steps)
    model, diffusion, module = common.model_from_checkpoint(ckpt, device)
    if not 1 <= args.steps <= diffusion.num_timesteps:
        common.fail(f"--steps must be in [1, {diffusion.num_timesteps}]")
    cfg = ckpt["model_config"]
    shape = (1, cfg["channels"], cfg["image_size"], cfg["image_size"])
    out_dir = common.check_writable_dir(args.out_dir)
    guidance = ckpt.get("args", {}).get("guidance", 1.0)
    if cfg.get("num_classes") and not all(0 <= c < cfg["num_classes"] for c in args.classes):
        common.fail(f"--classes must be in [0, {cfg['num_classes']}) for this checkpoint, got {args.classes}")
    # conditional models sample one fixed class for the noise path
    y = torch.tensor([args.classes[0]], device=device) if cfg.get("num_classes") else None
    modes = ["noise", "images"] + (["classes"] if cfg.get("num_classes") else []) \
        if args.mode == "all" else [args.mode]
    if student_steps and "images" in modes:
        print("note: mode images skipped: a distilled student cannot invert images; its teacher can")
        modes.remove("images")
    data = load_images(args, ckpt) if "images" in modes else None  # before any mode writes
    report = {}
    with torch.no_grad():
        for mode in modes:
            if mode == "noise":
                report["noise"] = noise_mode(args, diffusion, shape, device, out_dir, y, guidance)
            elif mode == "images":
                report["images"] = images_mode(args, diffusion, ckpt, data, device, out_dir)
            else:
                report["classes"] = classes_mode(args, diffusion, module, ckpt, shape, device, out_dir, guidance)
    for mode, r in report.items():
        print(f"{mode:<8} " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in r.items()))
    print(f"wrote {', '.join(f'{m}_interpolation.png/.gif' for m in ('noise', 'image', 'class') if (out_dir / f'{m}_interpolation.png').exists())} in {out_dir}")
    return report


if __name__ == "__main__":
    common.run(main, parse_args)
