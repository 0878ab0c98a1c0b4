"""Measure training and sampling speed. Example: python benchmark.py --quick

Training: images/s of full optimizer steps (forward, backward, the training script's default
optimizer, EMA) and peak memory (process RSS while it runs on the CPU, max allocated on CUDA),
for the MNIST model and each CIFAR preset.
Sampling: images/s for DDPM (1000 steps) and DDIM (10 and 50 steps) at several batch sizes.
Each figure is the median of --repeats timed runs after a warm-up run.
Against the machine's limit: the FLOPs of a training step and of a forward pass are counted
(torch.utils.flop_counter), so each row also shows its achieved GFLOP/s, beside the peak: the
faster, in the same precision, of one large matrix multiply (BLAS) and one large 3x3
convolution (oneDNN or cuDNN, the library that runs the network's convolutions).
With --phases, each phase of a training step (forward and loss, backward, optimizer, EMA) is
also timed on its own, with its own FLOPs: where the step's time goes.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import threading
import time
from pathlib import Path

import torch

import common
import diffusion
import diffusion_cifar
import train_diffusion
import train_diffusion_cifar
import optimizers


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def median_time(fn, device, repeats):
    fn()  # warm-up: allocations, kernel selection, compilation
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn):
    """Floating-point operations that fn() performs in torch ops (matmuls and convolutions: a
    multiply-add counts 2), by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_gflops(device, bf16, n=2048, repeats=5):
    """GFLOP/s of an n x n by n x n matrix multiply, through the BLAS library (MKL on x86)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, device, repeats)
    return 2 * n ** 3 / seconds / 1e9


def conv_peak_gflops(device, bf16, batch=16, channels=256, size=28, repeats=5):
    """GFLOP/s of one large 3x3 convolution (channels in and out, size x size, channels_last),
    through the library that runs the network's convolutions (oneDNN on the CPU, cuDNN on CUDA).

    A matmul goes through BLAS instead, and the two need not agree: on a 2-core AMD EPYC of
    family 26 (torch 2.14.1 with MKL) the 2048 x 2048 matmul reached 208 GFLOP/s in float32
    and this convolution 517 (RESULTS.md), so the peak is the faster of the two."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    x, w = (v.contiguous(memory_format=torch.channels_last) for v in (x, w))
    seconds = median_time(lambda: torch.nn.functional.conv2d(x, w, padding=1), device, repeats)
    return 2 * batch * channels * channels * 9 * size * size / seconds / 1e9


def rss_mb():
    """This process's resident memory now, from /proc (Linux), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def with_peak_memory(fn, device):
    """(fn(), peak memory in MiB while it ran): max allocated on CUDA; on the CPU, the highest
    resident set size seen by a thread that polls every 5 ms."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        return result, torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak, done = [rss_mb()], threading.Event()

    def poll():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_mb())

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak[0], rss_mb())


def models(args):
    """(name, module, model config, schedule) for every model to measure."""
    # the MNIST network as train_diffusion.py builds it by default (self-conditioned)
    out = [("mnist", diffusion, diffusion.DiffusionModel(self_cond=True).config, "cosine")]
    for preset in diffusion_cifar.PRESETS:
        out.append((f"cifar-{preset}", diffusion_cifar, dict(diffusion_cifar.PRESETS[preset]), "linear"))
    if args.models:
        unknown = set(args.models) - {name for name, *_ in out}
        if unknown:
            common.fail(f"unknown --models {sorted(unknown)}; choose from {[n for n, *_ in out]}")
        out = [m for m in out if m[0] in args.models]
    return out


def training_step(module, config, schedule, batch, device, args):
    """The network and one training step as train_diffusion*.py runs it (forward and loss,
    backward, gradient clipping and the script's default optimizer, EMA), in its four phases:
    returns (model, {phase name: function}), the functions to be called in order."""
    amp = args.amp == "bf16"
    layout = common.memory_format(device, amp)  # as training.Trainer
    model = module.DiffusionModel(**config).to(device, memory_format=layout)
    defaults = (train_diffusion if module is diffusion else train_diffusion_cifar).parse_args([])
    diff = common.make_diffusion(module, model, config, 1000, schedule, defaults.prediction).to(device)
    ema = module.EMA(model)
    opt = optimizers.make_optimizer(model, defaults.optimizer, 1e-4, 0.0, device)  # the script's
    shape = (batch, config["channels"], config["image_size"], config["image_size"])
    x0 = torch.randn(shape, device=device).contiguous(memory_format=layout)
    if args.compile:
        diff.model = torch.compile(model)
    # the MNIST default trains on stable targets: --reference-size random training images per
    # step, gathered and converted as Trainer.reference_set does (here from random uint8 images)
    n_reference = getattr(defaults, "reference_size", 0)
    pool = torch.randint(0, 256, (60000, *shape[1:]), dtype=torch.uint8) if n_reference else None
    loss = {}

    def forward():  # as Trainer.train_step: stable targets, then the loss (with self-conditioning)
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        x0_target, noise_target = x0, noise
        if n_reference:
            images = common.to_model_range(pool[torch.randint(len(pool), (n_reference,))])
            pool_images = torch.cat([x0, images.to(device).contiguous(memory_format=layout)])
            x0_target, noise_target = module.stable_targets(diff, x0, t, noise, pool_images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss["value"] = diff.loss(x0_target, None, t, noise_target)

    def backward():
        opt.zero_grad(set_to_none=True)
        loss.pop("value").backward()

    def optimizer():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return model, {"forward": forward, "backward": backward, "optimizer": optimizer,
                   "EMA": lambda: ema.update(model)}


def bench_training(name, module, config, schedule, batch, device, args):
    model, phases = training_step(module, config, schedule, batch, device, args)

    def steps(each=lambda phase, fn: fn()):
        # the same coin flips (a self-conditioned network's second call) in every repeat and
        # in the FLOP count, so that images/s and FLOPs describe the same steps
        torch.manual_seed(0)
        for _ in range(args.train_steps):
            for phase, fn in phases.items():
                each(phase, fn)

    seconds, peak = with_peak_memory(lambda: median_time(steps, device, args.repeats), device)
    # forward + backward (and Muon's matrix products, where it is the optimizer), per image
    flops = count_flops(steps) / (batch * args.train_steps)
    images_per_s = batch * args.train_steps / seconds
    rows = [{"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
             "task": "train", "batch": batch, "images_per_s": images_per_s, "ms_per_step":
             1000 * seconds / args.train_steps, "gflop_per_image": flops / 1e9,
             "gflops": flops * images_per_s / 1e9, "peak_mem_mb": peak}]
    if args.phases:
        rows += phase_rows(name, steps, list(phases), batch, device, args)
    return rows


def phase_rows(name, steps, phases, batch, device, args):
    """Where a training step's time goes: each phase timed on its own (the device synchronized
    after each) over the same steps as the train row, with its FLOPs and GFLOP/s."""
    seconds = {phase: [] for phase in phases}
    flops = dict.fromkeys(phases, 0)

    def timed(phase, fn):
        start = time.perf_counter()
        fn()
        sync(device)
        seconds[phase][-1] += time.perf_counter() - start

    def counted(phase, fn):
        flops[phase] += count_flops(fn)

    steps()  # warm-up
    sync(device)
    for _ in range(args.repeats):
        for times in seconds.values():
            times.append(0.0)
        steps(timed)
    steps(counted)
    rows = []
    for phase in phases:
        per_step = statistics.median(seconds[phase]) / args.train_steps
        row = {"model": name, "task": f"train: {phase}", "batch": batch, "ms_per_step": 1000 * per_step}
        if flops[phase]:
            row.update(gflop_per_image=flops[phase] / (batch * args.train_steps) / 1e9,
                       gflops=flops[phase] / args.train_steps / per_step / 1e9)
        rows.append(row)
    return rows


def bench_sampling(name, module, config, schedule, sampler, steps, batch, device, args):
    model = module.DiffusionModel(**config).to(device, memory_format=torch.channels_last).eval()
    shape = (batch, config["channels"], config["image_size"], config["image_size"])
    measured = steps
    if sampler == "ddpm" and not args.full_ddpm:
        # every DDPM step costs the same, so time args.ddpm_probe steps and scale to 1000
        measured = min(args.ddpm_probe, steps)
    diff = module.GaussianDiffusion(model, measured if sampler == "ddpm" else 1000, schedule).to(device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            if sampler == "ddpm":
                diff.ddpm_sample(shape)
            else:
                diff.ddim_sample(shape, steps=steps)

    seconds, peak = with_peak_memory(lambda: median_time(run, device, args.repeats), device)
    seconds *= steps / measured
    label = f"{sampler}-{steps}" + ("" if measured == steps else f" (timed {measured} steps)")
    return {"model": name, "task": label, "batch": batch, "images_per_s": batch / seconds,
            "seconds_per_batch": seconds, "peak_mem_mb": peak}


def bench_diffusers_baseline(batch, device, args):
    """The diffusers UNet2DModel of the same widths, for comparison (optional package)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        return []
    widths = tuple(diffusion.DiffusionModel().config["hidden_dims"])  # the MNIST default
    net = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=widths,
                      norm_num_groups=8,  # one count for all widths; diffusion.py used 8 until groups of 8 channels
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")).to(device)
    params = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)

    def train():
        for _ in range(args.train_steps):
            loss = torch.nn.functional.mse_loss(net(x, t).sample, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def forward():
        net(x, t)

    rows = [{"model": "diffusers UNet2DModel", "params_m": params, "task": "train", "batch": batch,
             "images_per_s": batch * args.train_steps / median_time(train, device, args.repeats)}]
    net.eval()
    rows.append({"model": "diffusers UNet2DModel", "params_m": params, "task": "forward",
                 "batch": batch, "images_per_s": batch / median_time(forward, device, args.repeats)})
    return rows


def bench_forward(name, module, config, batch, device, args):
    model = module.DiffusionModel(**config).to(device, memory_format=torch.channels_last).eval()
    x = torch.randn(batch, config["channels"], config["image_size"], config["image_size"],
                    device=device).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=device)

    @torch.no_grad()
    def forward():
        model(x, t)

    images_per_s = batch / median_time(forward, device, args.repeats)
    flops = count_flops(forward) / batch
    return {"model": name, "task": "forward", "batch": batch, "images_per_s": images_per_s,
            "gflop_per_image": flops / 1e9, "gflops": flops * images_per_s / 1e9}


def markdown(rows, header):
    cols = ["model", "params_m", "task", "batch", "images_per_s", "ms_per_step", "gflop_per_image",
            "gflops", "percent_of_peak", "peak_mem_mb"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append((f"{v:.3f}" if c == "gflop_per_image" else f"{v:.1f}") if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller run: under a minute on 2 CPU cores")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256],
                   help="sampling batch sizes")
    p.add_argument("--train-batch", type=int, default=128, help="batch size of the training and forward rows")
    p.add_argument("--train-steps", type=int, default=3, help="optimizer steps per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is reported")
    p.add_argument("--models", nargs="+", default=None,
                   help="which models: mnist, or cifar-<preset> for each preset of diffusion_cifar.py: "
                        + ", ".join(f"cifar-{name}" for name in diffusion_cifar.PRESETS) + " (default: all)")
    p.add_argument("--no-sampling", action="store_true", help="time training and forward only")
    p.add_argument("--ddpm-probe", type=int, default=20,
                   help="DDPM steps actually timed; the figure is scaled to 1000 steps")
    p.add_argument("--full-ddpm", action="store_true", help="time all 1000 DDPM steps")
    p.add_argument("--baseline", action="store_true",
                   help="also time the diffusers UNet2DModel of the same widths, if installed")
    p.add_argument("--amp", choices=["none", "bf16"], default="none", help="precision: none (float32) or bf16 autocast")
    p.add_argument("--phases", action="store_true",
                   help="also time each phase of a training step (forward, backward, optimizer, "
                        "EMA) on its own, with its GFLOP/s: where the step's time goes")
    p.add_argument("--compile", action="store_true", help="torch.compile the network for the training rows")
    p.add_argument("--json", default=None, help="write the rows here as JSON")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=common.seed_arg, default=0, help="random seed")
    p.add_argument("--out-dir", default=None, help="also write benchmark.md and benchmark.json here")
    return p.parse_args(argv)


def main(args):
    device = common.pick_device(args.device)
    common.configure_backends(device)
    torch.manual_seed(args.seed)
    if args.quick:
        args.batch_sizes, args.repeats, args.train_steps, args.ddpm_probe = [64], 2, 2, 5
        args.models = args.models or ["mnist"]
    if min(args.batch_sizes + [args.train_batch, args.train_steps, args.repeats, args.ddpm_probe]) < 1:
        common.fail("batch sizes, --train-steps, --repeats and --ddpm-probe must be at least 1")
    for name, value in [("train_batch", args.train_batch)] + [("batch_sizes", b) for b in args.batch_sizes]:
        common.check_range(name, value, 1, common.LIMITS["batch_size"])
    common.check_writable_file(args.json, "--json", (".json",))  # before minutes of timing
    if args.out_dir:
        common.check_writable_dir(args.out_dir)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "amp": args.amp, "compile": args.compile,
           "matmul_peak_gflops": round(matmul_peak_gflops(device, args.amp == "bf16"), 1),
           "conv_peak_gflops": round(conv_peak_gflops(device, args.amp == "bf16"), 1)}
    env["peak_gflops"] = max(env["matmul_peak_gflops"], env["conv_peak_gflops"])
    header = ", ".join(f"{k} {v}" for k, v in env.items())
    print(header)
    rows = []
    for name, module, config, schedule in models(args):
        measured = bench_training(name, module, config, schedule, args.train_batch, device, args)
        measured.append(bench_forward(name, module, config, args.train_batch, device, args))
        print(*measured, sep="\n")
        rows += measured
        sampling = [] if args.no_sampling else [("ddim", 10), ("ddim", 50), ("ddpm", 1000)]
        for sampler, steps in sampling:
            for batch in args.batch_sizes:
                rows.append(bench_sampling(name, module, config, schedule, sampler, steps, batch, device, args))
                print(rows[-1])
    if args.baseline:
        rows += bench_diffusers_baseline(args.train_batch, device, args)
    for r in rows:
        if "gflops" in r:
            r["percent_of_peak"] = 100 * r["gflops"] / env["peak_gflops"]
    table = markdown(rows, header)
    print("\n" + table)
    result = {"env": env, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.out_dir) / "benchmark.md").write_text(table + "\n")
        (Path(args.out_dir) / "benchmark.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    common.run(main, parse_args)
