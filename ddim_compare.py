"""DDPM, DDIM and DPM-Solver++ at many step counts, and distilled students, from the same initial noise.

Example: python ddim_compare.py --checkpoint runs/mnist/best.pt --num-samples 500
         python ddim_compare.py --checkpoint runs/mnist/last.pt --steps 4 50 --student runs/distill/student_4.pt

For each setting it measures wall time, images/s and FID (through evaluate.py), and on a fixed
subset of the samples (--distance-samples, the first 64 by default) the mean pixel distance to
deterministic DDIM with all T steps from the same noise: the ODE solution that DDIM (eta = 0)
and DPM-Solver++ approach as their steps grow. Writes comparison_grid.png, quality_vs_steps.png
(with FID), time_vs_steps.png, results.csv and results.json under --out-dir.
"""

import argparse
import csv
import json
import time
from pathlib import Path

import torch

import common
import evaluate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint from either training script")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 200, 1000],
                   help="DDIM step counts")
    p.add_argument("--eta", type=float, nargs="+", default=[0.0], help="DDIM eta values")
    p.add_argument("--dpm-steps", type=int, nargs="+", default=None,
                   help="DPM-Solver++(2M) step counts (default: 10 20 50, those up to T)")
    p.add_argument("--student", nargs="+", default=[],
                   help="distilled students of this model (distill.py's student_N.pt), each a row "
                        "with its own N steps")
    p.add_argument("--no-ddpm", action="store_true", help="skip DDPM over all T steps")
    p.add_argument("--no-dpm", action="store_true", help="skip DPM-Solver++")
    p.add_argument("--distance-samples", type=int, default=64,
                   help="how many of the samples (the first ones) are also drawn with DDIM over all "
                        "T steps, the reference for the distance column; 0 skips it")
    p.add_argument("--num-samples", type=int, default=500, help="images per setting, from the same initial noise")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampler call")
    p.add_argument("--class", dest="class_id", type=int, default=None,
                   help="conditional models: sample only this class (default: all, in turn)")
    p.add_argument("--guidance", type=float, default=None, help="default: the training setting")
    p.add_argument("--no-fid", action="store_true", help="skip FID (no classifier needed)")
    evaluate.add_feature_args(p)
    p.add_argument("--data-dir", default="./data", help=common.DATA_DIR_HELP)
    p.add_argument("--save-npz", action="store_true", help="save each setting's samples as .npz")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=common.seed_arg, default=0, help="random seed")
    p.add_argument("--out-dir", default="runs/ddim_compare", help="where the figures, results.csv and results.json go")
    return p.parse_args(argv)


def settings(args, T, students=()):
    """(sampler, steps, eta, process) for every row: DDPM, then DDIM for each eta, then
    DPM-Solver++, all of the --checkpoint's process (None); then each student with its own."""
    rows = [] if args.no_ddpm else [("ddpm", T, 1.0, None)]
    for eta in args.eta:
        rows += [("ddim", s, eta, None) for s in sorted(set(args.steps))]
    if not args.no_dpm:
        rows += [("dpm++", s, 0.0, None) for s in sorted(set(args.dpm_steps))]
    return rows + [("student", steps, 0.0, process) for steps, process in students]


def name_of(sampler, steps, eta):
    """ddim_10, ddpm_1000, ddim_10_eta0.5, dpm++_10, student_4: also the .npz file name."""
    return f"{sampler}_{steps}" + (f"_eta{eta:g}" if sampler == "ddim" and eta != 0 else "")


def load_students(paths, ckpt, device):
    """(N, process) of each distilled student; each must make the --checkpoint's images."""
    students = []
    for path in paths:
        student = common.load_checkpoint(path)
        n = common.distilled_steps(student)
        if n is None:
            common.fail(f"--student {path} is not a distilled student (distill.py writes student_N.pt); "
                        f"compare a trained model with --checkpoint")
        for key in ("image_size", "channels", "num_classes"):
            if student["model_config"].get(key) != ckpt["model_config"].get(key):
                common.fail(f"--student {path} makes other images than --checkpoint ({key} "
                            f"{student['model_config'].get(key)} against {ckpt['model_config'].get(key)})")
        model, process, _ = common.model_from_checkpoint(student, device)
        model.to(memory_format=torch.channels_last)
        students.append((n, process))
    if len({n for n, _ in students}) < len(students):
        common.fail("give at most one --student per step count, so that each row has one name")
    return students


@torch.no_grad()
def draw(diffusion, sampler, steps, eta, noise, y, guidance, batch_size, seed):
    """Samples from the given initial noise, in batches; the same seed drives any added noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(noise), batch_size):
        xT = noise[i:i + batch_size]
        yb = y[i:i + batch_size] if y is not None else None
        out.append(common.sample(diffusion, sampler, xT.shape, steps, eta, yb, guidance, g, noise=xT).cpu())
    return torch.cat(out)


def plot_vs_steps(results, key, ylabel, path, title):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for eta in sorted({r["eta"] for r in results if r["sampler"] == "ddim"}):
        pts = [(r["steps"], r[key]) for r in results if r["sampler"] == "ddim" and r["eta"] == eta
               and r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"DDIM eta={eta:g}")
    pts = [(r["steps"], r[key]) for r in results if r["sampler"] == "dpm++" and r[key] is not None]
    if pts:
        ax.plot(*zip(*pts), "^-", color="C3", label="DPM-Solver++(2M)")
    pts = [(r["steps"], r[key]) for r in results if r["sampler"] == "student" and r[key] is not None]
    if pts:
        ax.plot(*zip(*sorted(pts)), "*-", color="C2", ms=12, label="distilled students (distill.py)")
    for r in results:
        if r["sampler"] == "ddpm" and r[key] is not None:
            ax.axhline(r[key], color="k", ls="--", label=f"DDPM, {r['steps']} steps")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args):
    device = common.pick_device(args.device)
    ckpt = common.load_checkpoint(args.checkpoint)
    if common.distilled_steps(ckpt):
        common.fail(f"{args.checkpoint} is a distilled student, which samples only with its own "
                    f"steps; give its teacher as --checkpoint and the student as --student")
    model, diffusion, _ = common.model_from_checkpoint(ckpt, device)
    model.to(memory_format=torch.channels_last)
    T = diffusion.num_timesteps
    cfg = ckpt["model_config"]
    if args.dpm_steps is None:
        args.dpm_steps = [s for s in (10, 20, 50) if s <= T]
    for name in ("steps", "dpm_steps"):
        if any(not 1 <= s <= T for s in getattr(args, name)):
            common.fail(f"every --{name.replace('_', '-')} value must be in [1, {T}] for this "
                        f"checkpoint, got {getattr(args, name)}")
    if args.num_samples < 2 or args.batch_size < 1:
        common.fail("--num-samples must be at least 2 and --batch-size at least 1")
    if args.distance_samples < 0:
        common.fail(f"--distance-samples must be >= 0, got {args.distance_samples}")
    common.check_finite(eta=args.eta, guidance=args.guidance)
    students = load_students(args.student, ckpt, device)
    if any(not 0 <= e <= 1 for e in args.eta):
        common.fail(f"--eta values must be in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), got {args.eta}")
    common.check_range("num_samples", args.num_samples, 2, common.LIMITS["num_samples"])
    num_classes = cfg.get("num_classes")
    if args.class_id is not None and not num_classes:
        common.fail("--class needs a class-conditional checkpoint (trained with --class-cond); this one is not")
    if args.class_id is not None and not 0 <= args.class_id < num_classes:
        common.fail(f"--class must be in [0, {num_classes}) for this checkpoint, got {args.class_id}")
    dataset = ckpt.get("args", {}).get("dataset", "mnist")
    if not args.no_fid:  # comparing samplers needs no scores: without a classifier, skip them
        missing = None
        if dataset not in evaluate.SHAPES:
            missing = f"FID needs a reference data set, and this model was trained on {dataset!r}"
        else:
            args.features = evaluate.feature_space(dataset, args.features)  # chosen (and announced) once
            path = args.classifier or evaluate.default_classifier_path(dataset)
            if args.features == "classifier" and args.classifier is None and not Path(path).is_file():
                missing = (f"no classifier at {path}; to add the scores, train one once: "
                           f"python evaluate.py train-classifier --dataset {dataset}")
        if missing:
            print(f"note: no FID column. {missing}")
            args.no_fid = True
    if not args.no_fid:
        evaluate.check_feature_network(dataset, args, device)  # before minutes of sampling

    out_dir = common.check_writable_dir(args.out_dir)  # before the sampling, not after
    shape = (args.num_samples, cfg["channels"], cfg["image_size"], cfg["image_size"])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    y = None
    if num_classes:
        y = (torch.full((shape[0],), args.class_id) if args.class_id is not None
             else torch.arange(shape[0]) % num_classes).to(device)
    guidance = ckpt.get("args", {}).get("guidance", 1.0) if args.guidance is None else args.guidance

    def run(sampler, steps, eta, process):
        start = time.perf_counter()
        x = draw(process or diffusion, "ddim" if process else sampler, steps, eta, noise, y, guidance,
                 args.batch_size, args.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x, time.perf_counter() - start

    samples = {}  # setting name -> images in [-1, 1]
    n_ref = min(args.distance_samples, args.num_samples)
    reference = None
    results, grid_rows, grid_labels = [], [], []
    for sampler, steps, eta, process in settings(args, T, students):
        name = name_of(sampler, steps, eta)
        print(f"{name}: sampling {args.num_samples} images ...")
        x, seconds = run(sampler, steps, eta, process)
        samples[name] = x
        if sampler == "ddim" and steps == T and eta == 0:
            reference = x[:n_ref]
        images = common.to_uint8(x).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        fid = None
        if not args.no_fid:
            requested = y.cpu().numpy() if y is not None else None
            fid = evaluate.evaluate_images(images, dataset, args, device, requested)["fid"]
        if args.save_npz:
            evaluate.save_npz(images, out_dir / f"{name}.npz")
        results.append({"setting": name, "sampler": sampler, "steps": steps,
                        "eta": eta if sampler == "ddim" else None, "seconds": seconds,
                        "images_per_s": args.num_samples / seconds, "fid": fid})
        grid_rows.append(x[:8])
        label = f"student, {steps} steps" if process else common.sampler_label(sampler, steps, eta)
        grid_labels.append(f"{label}\n{seconds:.1f} s")
    if n_ref and reference is None:  # deterministic DDIM over all T steps: the ODE's solution
        print(f"ddim_{T} on the first {n_ref} samples (reference for the distance column) ...")
        start = time.perf_counter()
        reference = draw(diffusion, "ddim", T, 0.0, noise[:n_ref], y[:n_ref] if y is not None else None,
                         guidance, args.batch_size, args.seed)
        print(f"  took {time.perf_counter() - start:.1f} s")
    for r in results:
        # mean absolute pixel difference on the reference subset, in units of the [0, 1] range
        r["distance_to_ddim_T"] = (float((samples[r["setting"]][:n_ref] - reference).abs().mean() / 2)
                                   if n_ref else None)

    common.image_rows_figure(
        grid_rows, grid_labels, out_dir / "comparison_grid.png",
        f"The same initial noise in every row, {device.type} seconds for {args.num_samples} images. "
        f"DDIM (eta 0) and DPM-Solver++ solve one ODE\nand converge to the same images; DDPM and "
        f"DDIM with eta > 0 add fresh noise at every step, so their images differ."
        + ("\nA distilled student follows its teacher's DDIM map in its own few steps." if students else ""))
    if not args.no_fid:
        plot_vs_steps(results, "fid", "FID (lower is better)", out_dir / "quality_vs_steps.png",
                      "Sample quality against sampling steps")
    plot_vs_steps(results, "seconds", f"seconds for {args.num_samples} images",
                  out_dir / "time_vs_steps.png", f"Wall time on {device.type}")
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(results[0]))
        w.writeheader()
        w.writerows(results)
    (out_dir / "results.json").write_text(json.dumps(
        {"checkpoint": str(args.checkpoint), "num_samples": args.num_samples, "device": str(device),
         "guidance": guidance if num_classes else None, "distance_samples": n_ref,
         "results": results}, indent=2))

    dist_head = f"dist to DDIM-{T} ({n_ref})" if n_ref else "dist (skipped)"
    print(f"\n{'setting':<18} {'seconds':>9} {'img/s':>9} {'FID':>9} {dist_head:>24}")
    for r in results:
        fid = f"{r['fid']:.3f}" if r["fid"] is not None else "-"
        dist = f"{r['distance_to_ddim_T']:.4f}" if r["distance_to_ddim_T"] is not None else "-"
        print(f"{r['setting']:<18} {r['seconds']:>9.2f} {r['images_per_s']:>9.1f} {fid:>9} {dist:>24}")
    if n_ref:
        print(f"distance: mean |x - x_ddim{T}| / 2 over the first {n_ref} samples, from the same noise")
    plots = "comparison_grid.png, " + ("" if args.no_fid else "quality_vs_steps.png, ")
    print(f"wrote {out_dir}/{plots}time_vs_steps.png, results.csv, results.json")
    return results


if __name__ == "__main__":
    common.run(main, parse_args)
