"""Turn a training checkpoint into a small file for sampling: the EMA weights and the configuration.

Example: python export.py --checkpoint runs/mnist/last.pt --out pretrained/mnist.pt

A training checkpoint also holds the raw weights, the optimizer's two moments, the counters
and the random states, four times the size of the weights. Sampling needs only the EMA
weights. In float16 they take half again, and the script measures what that costs: it samples
--check-samples images with DDIM from the same noises with the float32 weights and with the
float16 ones (float32 arithmetic either way), and keeps float16 only if the mean change is at
most --tolerance grey levels. Every sampling script loads the result; training cannot be
resumed from it (train_diffusion.py --resume says so).
"""

import argparse

import torch

import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a last.pt or best.pt of either training script")
    p.add_argument("--out", required=True, help="the weights-only file to write (.pt)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="how the weights are stored")
    p.add_argument("--check-samples", type=int, default=64,
                   help="images sampled with both precisions to measure the change (0: no check)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the check")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="largest mean change of a pixel, in grey levels of 255, that float16 may cost")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint at --out")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    return p.parse_args(argv)


def weights_only(ckpt, dtype):
    """The sampling part of a checkpoint, with the EMA weights in `dtype`, and where it came from."""
    cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in ckpt["ema"]["shadow"].items()}
    state = ckpt.get("state", {})
    return {"kind": ckpt["kind"], "model_config": ckpt["model_config"], "diffusion": ckpt["diffusion"],
            "ema": {"shadow": cast}, "args": ckpt.get("args", {}),
            "trained": {"optimizer_steps": state.get("step"), "epoch": state.get("epoch"),
                        "minutes": round(float(ckpt.get("elapsed_s", 0.0)) / 60, 2),
                        "best_val": state.get("best_val"), "stored_as": str(dtype).replace("torch.", "")}}


@torch.no_grad()
def sample_change(ckpt, small, n, steps, device):
    """Mean and largest |difference| of n DDIM samples, in grey levels, between two checkpoints."""
    noise = torch.randn((n, ckpt["model_config"]["channels"], ckpt["model_config"]["image_size"],
                         ckpt["model_config"]["image_size"]), generator=torch.Generator().manual_seed(0))
    out = []
    for c in (ckpt, small):
        _, diffusion, _ = common.model_from_checkpoint(c, device)
        y = torch.arange(n, device=device) % c["model_config"]["num_classes"] \
            if c["model_config"].get("num_classes") else None
        x = common.sample(diffusion, "ddim", noise.shape, steps, y=y, noise=noise.to(device))
        out.append(common.to_uint8(x).float().cpu())
    diff = (out[0] - out[1]).abs()
    return diff.mean().item(), diff.max().item()


def main(args):
    common.check_writable_file(args.out, "--out", (".pt",), args.overwrite)
    common.check_range("check_samples", args.check_samples, 0, common.LIMITS["num_samples"])
    ckpt = common.load_checkpoint(args.checkpoint)
    if common.distilled_steps(ckpt):
        common.fail(f"{args.checkpoint} is a distilled student, already weights-only")
    if not 1 <= args.steps <= ckpt["diffusion"]["timesteps"]:
        common.fail(f"--steps must be in [1, {ckpt['diffusion']['timesteps']}]")
    device = common.pick_device(args.device)
    small = weights_only(ckpt, getattr(torch, args.dtype))
    if args.dtype == "float16" and args.check_samples:
        mean, largest = sample_change(ckpt, small, args.check_samples, args.steps, device)
        print(f"float16 against float32 weights, {args.check_samples} DDIM-{args.steps} samples from "
              f"the same noises: pixels change by {mean:.3f} grey levels on average, {largest:.0f} at most")
        small["trained"]["float16_change"] = {"mean": mean, "max": largest, "samples": args.check_samples}
        if mean > args.tolerance:
            common.fail(f"float16 changes the samples by {mean:.3f} grey levels on average, more than "
                        f"--tolerance {args.tolerance}; export with --dtype float32")
    common.save_checkpoint(small, args.out)
    size = sum(v.numel() * v.element_size() for v in small["ema"]["shadow"].values())
    print(f"wrote {args.out}: {args.dtype} EMA weights ({size / 1e6:.2f} MB) and the configuration, "
          f"from {small['trained']['optimizer_steps']} steps, {small['trained']['minutes']:.1f} minutes")
    return small


if __name__ == "__main__":
    common.run(main, parse_args)
