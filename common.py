"""What the scripts share: device choice, data sets, checkpoints, pictures, and the training loop.

The model modules (diffusion.py, diffusion_cifar.py) do not import this file; the scripts do.
Sections: 1. errors and devices, 2. data sets, 3. checkpoints, 4. pictures and metrics,
5. the training loop shared by train_diffusion.py and train_diffusion_cifar.py.
"""

import copy
import csv
import gzip
import math
import os
import pickle
import signal
import struct
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------
# 1. Errors and devices


def fail(message):
    """Stop with a clear message and exit status 1: for bad input, never for bugs."""
    raise SystemExit(f"error: {message}")


def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but no CUDA GPU is available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        fail("--device mps was asked for, but MPS is not available")
    return device


def configure_backends(device):
    """On CUDA: let cuDNN pick the fastest conv algorithms for our fixed shapes, and use
    TF32 tensor cores for float32 matmuls."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")


def cpu_has_fast_bf16():
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(amp, device):
    """Resolve --amp: 'auto' turns bf16 autocast on for CUDA GPUs and CPUs that support it well."""
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def memory_format(device, bf16):
    """channels_last (NHWC) speeds up convolutions on CUDA and in float32 on the CPU; with bf16
    autocast on the CPU the default NCHW layout is faster (measured on a 2-core AMD EPYC,
    MNIST model, batch 64: 236 img/s NCHW against 209 channels_last; float32 137 against 159)."""
    return torch.contiguous_format if device.type == "cpu" and bf16 else torch.channels_last


def check_finite(**values):
    """Every named number must be finite: NaN or inf in an argument would silently give NaN
    images or losses. Call as check_finite(eta=args.eta, guidance=args.guidance)."""
    for name, value in values.items():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and not math.isfinite(v):
                fail(f"--{name.replace('_', '-')} must be a finite number, got {v}")


def check_writable_dir(path, what="--out-dir"):
    """Create `path` (and parents) now, and prove that a file can be written there, so that a
    bad output folder fails before minutes of work, not after."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        fail(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"cannot write to {what} {path}: {e.strerror or e}")
    return path


def check_writable_file(path, what):
    """The folder of an output file must exist (it is created) and be writable."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        fail(f"{what} {path} is a folder; give a file name")
    check_writable_dir(path.parent, f"the folder of {what}")


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)


# ----------------------------------------------------------------------------------------
# 2. Data sets: uint8 tensors (N, C, H, W) in memory, plus labels or None

Dataset = namedtuple("Dataset", "images labels num_classes name")
TrainResult = namedtuple("TrainResult", "state model ema")

# torchvision's folder layout: <data-dir>/<folder>/raw/<prefix>-images-idx3-ubyte[.gz]
IDX_SETS = {"mnist": ("MNIST", "MNIST"), "fashion-mnist": ("FashionMNIST", "FashionMNIST")}
IDX_PREFIX = {"train": "train", "test": "t10k"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def read_idx(path):
    """Read an IDX file (the MNIST format), gzipped or not, into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        fail(f"could not read IDX file {path}: {e}")


def find_idx(folder, name):
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(dataset, data_dir, split="train", download=True):
    """MNIST or Fashion-MNIST from IDX files, downloaded by torchvision when missing.

    Looks in <data-dir>/<MNIST|FashionMNIST>/raw/ (torchvision's layout) and in <data-dir>
    itself, so that a folder of raw files, such as Debian's /usr/share/datasets/fashion-mnist,
    can be given directly.
    """
    folder_name, tv_name = IDX_SETS[dataset]
    data_dir = Path(data_dir)
    names = [f"{IDX_PREFIX[split]}-images-idx3-ubyte", f"{IDX_PREFIX[split]}-labels-idx1-ubyte"]
    folders = [data_dir / folder_name / "raw", data_dir]

    def locate():
        for folder in folders:
            found = [find_idx(folder, n) for n in names]
            if all(found):
                return found
        return None

    found = locate()
    if found is None and download:
        import torchvision
        print(f"{dataset} not found under {data_dir}; downloading with torchvision ...")
        try:
            getattr(torchvision.datasets, tv_name)(str(data_dir), train=(split == "train"),
                                                   download=True)
        except Exception as e:  # no network, a bad mirror, a full disk: all end the same way
            print(f"download failed: {type(e).__name__}: {e}", file=sys.stderr)
        found = locate()
    if found is None:
        fail(f"{dataset} ({split} split) is not in {data_dir} and could not be downloaded.\n"
             f"Put {names[0]}[.gz] and {names[1]}[.gz] into {folders[0]}/ (or pass "
             f"--data-dir to a folder that holds them), or connect to the internet.")
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        fail(f"IDX files in {found[0].parent} have inconsistent shapes "
             f"{images.shape} and {labels.shape}")
    images = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
    return Dataset(images, torch.from_numpy(labels.astype(np.int64)), 10, dataset)


def load_cifar10(data_dir, split="train", download=True):
    """CIFAR-10 from its python pickle batches (cifar-10-batches-py), downloading if missing."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((folder / f).is_file() for f in files) and download:
        import torchvision
        print(f"CIFAR-10 not found under {data_dir}; downloading with torchvision ...")
        try:
            torchvision.datasets.CIFAR10(str(data_dir), train=(split == "train"), download=True)
        except Exception as e:
            print(f"download failed: {type(e).__name__}: {e}", file=sys.stderr)
    if not all((folder / f).is_file() for f in files):
        fail(f"CIFAR-10 ({split} split) is not in {folder} and could not be downloaded.\n"
             f"Put the python-version batches ({', '.join(files)}) into {folder}/, "
             f"or connect to the internet.")
    images, labels = [], []
    for f in files:
        try:
            with open(folder / f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")  # the data set's own format
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        except Exception as e:
            fail(f"could not read CIFAR-10 batch {folder / f}: {type(e).__name__}: {e}")
    return Dataset(torch.from_numpy(np.concatenate(images)), torch.tensor(labels), 10, "cifar10")


def load_image_folder(path, image_size, channels):
    """Every image under `path`, converted to grayscale (channels=1) or RGB and resized.

    Images in two or more sub-folders are labelled by sub-folder (sorted names), as in
    torchvision's ImageFolder; otherwise labels are None.
    """
    from PIL import Image, UnidentifiedImageError
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        fail(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files})
    images = np.empty((len(files), channels, image_size, image_size), np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                im = im.resize((image_size, image_size), Image.BICUBIC)
        except (OSError, UnidentifiedImageError) as e:
            fail(f"could not read image {p}: {e}")
        a = np.asarray(im, np.uint8)
        images[i] = a[None] if channels == 1 else a.transpose(2, 0, 1)  # (C, H, W)
    labels = None
    if len(classes) > 1:
        index = {c: k for k, c in enumerate(classes)}
        labels = torch.tensor([index[p.parent.relative_to(root).as_posix()] for p in files])
    return Dataset(torch.from_numpy(images), labels, len(classes) if labels is not None else None,
                   root.name)


def load_dataset(dataset, data_dir, image_size, channels, split="train", download=True):
    """A named data set (mnist, fashion-mnist, cifar10) or a folder of images."""
    if dataset in IDX_SETS:
        data = load_idx_dataset(dataset, data_dir, split, download)
    elif dataset == "cifar10":
        data = load_cifar10(data_dir, split, download)
    elif Path(dataset).is_dir():
        return load_image_folder(dataset, image_size, channels)
    else:
        fail(f"--dataset {dataset!r} is neither a known data set "
             f"({', '.join([*IDX_SETS, 'cifar10'])}) nor a folder of images")
    if data.images.shape[1:] != (channels, image_size, image_size):
        fail(f"{dataset} images are {tuple(data.images.shape[1:])}, but the model expects "
             f"{(channels, image_size, image_size)}")
    return data


def split_train_val(n, val_size):
    """A fixed held-out split: the same indices on every run, whatever the training seed."""
    if not 0 < val_size < n:
        fail(f"--val-size must be between 1 and {n - 1} for a data set of {n} images, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return perm[val_size:], perm[:val_size]


def to_model_range(images_uint8):
    """uint8 pixels in [0, 255] -> float in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(images):
    """float in [-1, 1] -> uint8 in [0, 255]."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------
# 3. Checkpoints: one dict, written atomically, read with weights_only=True

MODEL_MODULES = {"mnist": "diffusion", "cifar": "diffusion_cifar"}
TRAIN_SCRIPTS = {"mnist": "train_diffusion.py", "cifar": "train_diffusion_cifar.py"}


def save_checkpoint(obj, path):
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind=None):
    """Read a checkpoint safely; with `kind`, insist that it holds that model ('mnist', 'cifar')."""
    path = Path(path)
    if not path.is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"could not read checkpoint {path}: it is corrupted or not a checkpoint "
             f"of this project ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    needed = {"kind", "model_config", "diffusion", "model", "ema"}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys() or \
            not all(isinstance(ckpt[k], dict) for k in ("model_config", "diffusion")):
        fail(f"{path} is not a checkpoint of this project (it lacks {sorted(needed)})")
    if ckpt["kind"] not in MODEL_MODULES:
        fail(f"{path} holds an unknown model kind {ckpt['kind']!r}")
    if kind is not None and ckpt["kind"] != kind:
        fail(f"{path} is a checkpoint of the {ckpt['kind']} model "
             f"({MODEL_MODULES[ckpt['kind']]}.py); use {TRAIN_SCRIPTS[ckpt['kind']]} with it, "
             f"not this script, which trains the {kind} model")
    # checkpoints saved before these options existed hold an eps model, and for MNIST a
    # network whose time embedding is added rather than scaling the norm
    ckpt["diffusion"].setdefault("prediction", "eps")
    if isinstance(ckpt.get("args"), dict):
        ckpt["args"].setdefault("t_power", 1.0)  # uniform training timesteps
    if ckpt["kind"] == "mnist":
        ckpt["model_config"].setdefault("adaptive_norm", False)
    check_weights_finite(ckpt, path)
    return ckpt


def check_weights_finite(ckpt, path):
    """NaN or inf weights would sample black images and train on with a NaN loss: refuse them."""
    ema = ckpt["ema"].get("shadow") if isinstance(ckpt["ema"], dict) else None
    tensors = {"model": ckpt["model"], "EMA": ema}
    for part, state in tensors.items():
        if not isinstance(state, dict):
            fail(f"{path} is damaged: its {part} weights are not a state dict")
        for name, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                fail(f"{path} holds non-finite (NaN or inf) {part} weights in {name}: the run "
                     f"that wrote it diverged or the file is damaged; use an earlier checkpoint")


def model_from_checkpoint(ckpt, device, use_ema=True):
    """Rebuild (model, diffusion, module) from a checkpoint's stored config alone."""
    import importlib
    module = importlib.import_module(MODEL_MODULES[ckpt["kind"]])
    try:
        model = module.DiffusionModel(**ckpt["model_config"])
        model.load_state_dict(ckpt["ema"]["shadow"] if use_ema else ckpt["model"])
    except (TypeError, RuntimeError, KeyError) as e:
        fail(f"the checkpoint's weights do not fit its model config: {str(e).splitlines()[0]}")
    model.to(device).eval()
    diffusion = module.GaussianDiffusion(model, **ckpt["diffusion"]).to(device)
    return model, diffusion, module


def rng_state():
    state = {"torch": torch.get_rng_state()}  # training draws all its randomness from torch
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------
# 4. Sampling by name, pictures and metrics

# The samplers a script can name: ancestral DDPM over all T steps, DDIM over --steps with --eta,
# and the second-order DPM-Solver++(2M) over --steps (deterministic, like DDIM with eta 0).
SAMPLERS = ("ddpm", "ddim", "dpm++")


def sample(diffusion, sampler, shape, steps=50, eta=0.0, y=None, guidance=1.0, generator=None,
           noise=None, progress=False):
    """Images in [-1, 1] from the named sampler of a model module's GaussianDiffusion."""
    kw = dict(y=y, guidance=guidance, generator=generator, noise=noise, progress=progress)
    if sampler == "ddpm":
        return diffusion.ddpm_sample(shape, **kw)
    if sampler == "ddim":
        return diffusion.ddim_sample(shape, steps=steps, eta=eta, **kw)
    if sampler == "dpm++":
        return diffusion.dpm_solver_sample(shape, steps=steps, **kw)
    raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")


def sampler_label(sampler, steps, eta=0.0):
    """A short human name: 'DDPM-1000', 'DDIM-50', 'DDIM-50 eta=1', 'DPM-Solver++ 10'."""
    if sampler == "ddpm":
        return f"DDPM-{steps}"
    if sampler == "ddim":
        return f"DDIM-{steps}" + (f" eta={eta:g}" if eta else "")
    return f"DPM-Solver++ {steps}"


def save_grid(images, path, nrow=8):
    """Save images in [-1, 1], shaped (N, C, H, W), as one PNG grid."""
    from torchvision.utils import save_image
    save_image((images.detach().float().cpu().clamp(-1, 1) + 1) / 2, str(path), nrow=nrow,
               padding=2, pad_value=1.0)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, so no display is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def show_image(ax, img):
    """Draw one (C, H, W) image in [-1, 1] on a matplotlib axis, without ticks."""
    im = ((img.detach().float().cpu().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
    ax.imshow(im.squeeze(-1) if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def image_rows_figure(rows, labels, path, title=None, extra=None):
    """Rows of (C, H, W) images in [-1, 1], each row labelled on the left. A None entry, or a
    row shorter than the longest, leaves the cell empty; extra(ax) draws a plot below."""
    plt = pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = plt.figure(figsize=(n_cols * 0.95 + 1.5, n_rows * 1.0 + (2.6 if extra else 0.6)))
    gs = fig.add_gridspec(n_rows + (2 if extra else 0), n_cols)
    for r, (imgs, label) in enumerate(zip(rows, labels)):
        for c in range(n_cols):
            ax = fig.add_subplot(gs[r, c])
            if c >= len(imgs) or imgs[c] is None:  # nothing to show in this cell
                ax.axis("off")
                continue
            show_image(ax, imgs[c])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if extra:
        extra(fig.add_subplot(gs[n_rows:, :]))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curve(rows, path):
    """Train and validation loss per epoch, from the metrics.csv rows."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["train_loss"] for r in rows], "o-", label="train")
    ax.plot(steps, [r["val_loss"] for r in rows], "s-", label="validation (fixed t, noise)")
    ax.set_xlabel("step")
    ax.set_ylabel("noise MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


METRIC_FIELDS = ["epoch", "step", "train_loss", "val_loss", "lr", "images_per_s", "elapsed_s"]


def read_metrics(path):
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def write_metrics(rows, path):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, METRIC_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (int(r[k]) if k == "step" else r[k]) for k in METRIC_FIELDS})
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# 5. The training loop, shared by train_diffusion.py and train_diffusion_cifar.py

# Arguments that a resumed run takes from the command line; all others come from the checkpoint.
RESUME_OVERRIDES = {"epochs", "max_steps", "max_minutes", "patience", "min_delta", "device",
                    "out_dir", "resume", "compile", "amp", "data_dir"}


def add_training_args(p):
    """The options both training scripts share. Each script sets its own defaults."""
    a = p.add_argument
    a("--data-dir", default="./data", help="where data sets are found or downloaded")
    a("--val-size", type=int, default=1000, help="held-out images for the validation loss")
    a("--epochs", type=int, default=100, help="most epochs to train")
    a("--max-steps", type=int, default=None, help="most optimizer steps to train")
    a("--max-minutes", type=float, default=None, help="wall-clock budget for training, minutes")
    a("--batch-size", type=int, default=128)
    a("--lr", type=float, default=2e-4, help="peak learning rate")
    a("--weight-decay", type=float, default=0.0)
    a("--warmup", type=int, default=500, help="linear learning-rate warmup, in steps")
    a("--lr-schedule", choices=["constant", "cosine"], default="constant",
      help="after warmup: constant, or cosine decay to 0 over --epochs or --max-minutes, "
           "whichever runs out first")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    a("--ema-decay", type=float, default=0.9999, help="EMA decay, reached after a warmup")
    a("--schedule", choices=["linear", "cosine"], default="linear")
    a("--prediction", choices=["eps", "v"], default="eps",
      help="what the network outputs: the noise eps (DDPM) or the velocity v (Salimans & Ho)")
    a("--timesteps", type=int, default=1000, help="T, the number of diffusion steps")
    a("--t-power", type=float, default=1.0,
      help="training timesteps t have density proportional to t^(power - 1): 1 is uniform, "
           "2 trains the noisier steps more")
    a("--class-cond", action="store_true", help="train a class-conditional model")
    a("--p-uncond", type=float, default=0.1, help="label dropout for classifier-free guidance")
    a("--guidance", type=float, default=2.0, help="classifier-free guidance scale for samples")
    a("--patience", type=int, default=5, help="epochs without improvement before stopping")
    a("--min-delta", type=float, default=1e-4, help="smallest validation-loss drop that counts")
    a("--sample-steps", type=int, default=50, help="DDIM steps for the sample grids")
    a("--compile", action="store_true", help="torch.compile the network (slow start, faster steps)")
    a("--amp", choices=["auto", "none", "bf16"], default="auto",
      help="bfloat16 autocast for training steps; auto: on where the hardware has fast bf16")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--seed", type=int, default=0)
    a("--resume", default=None, help="continue from this last.pt (or best.pt)")


def check_training_args(args):
    """Impossible arguments get a clear message instead of a failure deep inside torch."""
    positive = ["batch_size", "epochs", "timesteps", "sample_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        fail(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        fail(f"--max-minutes must be positive, got {args.max_minutes}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        fail(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.p_uncond < 1:
        fail(f"--p-uncond must be in [0, 1), got {args.p_uncond}")
    if not 0 <= args.ema_decay < 1:
        fail(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.sample_steps > args.timesteps:
        fail(f"--sample-steps ({args.sample_steps}) cannot exceed --timesteps ({args.timesteps})")
    if not 0 < args.t_power <= 10:
        fail(f"--t-power must be in (0, 10], got {args.t_power}")
    if args.warmup < 0 or args.patience < 1 or args.grad_clip <= 0:
        fail("--warmup must be >= 0, --patience >= 1 and --grad-clip > 0")


def setup_distributed(device_name):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def plain(args):
    """argparse.Namespace -> a dict of plain values, storable with weights_only=True."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def prepare_args(args, kind):
    """Check the arguments; with --resume, take the checkpoint's training arguments, keeping
    budgets and placement from the command line. Returns (args, checkpoint or None)."""
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, kind)
        # options newer than the checkpoint keep their defaults; the process (timesteps,
        # schedule, prediction) is always the one the checkpoint's network was trained with
        merged = {**vars(args), **ckpt["args"], **ckpt["diffusion"]}
        merged.update({k: v for k, v in vars(args).items() if k in RESUME_OVERRIDES})
        args = type(args)(**merged)
    check_training_args(args)
    return args, ckpt


def training_timesteps(n, num_timesteps, power, device):
    """n training timesteps drawn with density p(t) about proportional to t^(power - 1).

    power = 1 is DDPM's uniform t. power = 2 samples t in proportion to t: three quarters of
    the batch falls in the noisier half of the process. In expectation this is the uniform-t
    loss weighted by T p(t); the best prediction at each t is unchanged.
    """
    u = torch.rand(n, device=device)
    return (num_timesteps * u ** (1.0 / power)).long().clamp_(max=num_timesteps - 1)


def train(args, kind, module, model_config, data, augment=None, ckpt=None):
    """Train `module`.DiffusionModel(**model_config) on `data`; write checkpoints and pictures.

    kind: 'mnist' or 'cifar', stored in the checkpoint. augment: optional function applied to
    each float batch x -> x, such as random flips. ckpt: a checkpoint to resume from (see
    prepare_args). Returns TrainResult(state, model, ema): the counters, the trained network
    and its EMA.
    """
    rank, world, device = setup_distributed(args.device)
    configure_backends(device)
    main_proc = rank == 0
    out_dir = Path(args.out_dir)
    if main_proc:
        out_dir.mkdir(parents=True, exist_ok=True)

    # -- the model, its process, EMA and optimizer (same initial weights on every rank)
    torch.manual_seed(args.seed)
    bf16 = use_bf16(args.amp, device)
    layout = memory_format(device, bf16)
    model = module.DiffusionModel(**model_config).to(device, memory_format=layout)
    ema = module.EMA(model, args.ema_decay)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    sampler_diffusion = module.GaussianDiffusion(ema_model, args.timesteps, args.schedule,
                                                 args.prediction).to(device)
    # the fused (single-kernel) AdamW on CUDA; the foreach one elsewhere
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())

    state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "loss_sum": 0.0, "loss_count": 0,
             "best_val": math.inf, "bad_epochs": 0}
    rows = []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["state"])
        rng = ckpt["rng"][rank] if len(ckpt["rng"]) == world else None
        if rng is not None:
            set_rng_state(rng)
        else:
            torch.manual_seed(args.seed + rank + 1000 * state["step"])
        rows = [r for r in read_metrics(out_dir / "metrics.csv") if r["step"] <= state["step"]]
        if main_proc:
            print(f"resumed from {args.resume} at epoch {state['epoch']}, step {state['step']}")
    else:
        torch.manual_seed(args.seed + rank)  # a different noise stream on each rank

    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    diffusion = module.GaussianDiffusion(train_model, args.timesteps, args.schedule, args.prediction).to(device)

    # -- data: in memory; a DistributedSampler deals each epoch's shuffled indices to the ranks
    train_idx, val_idx = split_train_val(len(data.images), args.val_size)
    labels = data.labels if args.class_cond else None
    if args.class_cond and labels is None:
        fail("--class-cond needs labels, and this data set has none (an image folder needs "
             "one sub-folder per class)")
    from torch.utils.data.distributed import DistributedSampler
    sampler = DistributedSampler(range(len(train_idx)), num_replicas=world, rank=rank,
                                 shuffle=True, seed=args.seed, drop_last=True)
    batches_per_epoch = len(sampler) // args.batch_size
    if batches_per_epoch == 0:
        fail(f"{len(train_idx)} training images cannot fill one batch of {args.batch_size} "
             f"per process; lower --batch-size or --val-size")

    # the whole data set sits on the GPU (MNIST 47 MB, CIFAR-10 150 MB as uint8)
    images = data.images.to(device) if device.type == "cuda" else data.images

    # -- fixed validation timesteps and noise, and fixed sample noise: the same every epoch
    g = torch.Generator().manual_seed(1234)
    val_x0 = to_model_range(data.images[val_idx])
    val_t = torch.randint(0, args.timesteps, (len(val_idx),), generator=g)
    val_noise = torch.randn(val_x0.shape, generator=g)
    val_y = labels[val_idx] if labels is not None else None
    if labels is not None:
        sample_y = torch.arange(data.num_classes).repeat_interleave(8).to(device)  # a row per class
    else:
        sample_y = None
    n_samples = len(sample_y) if sample_y is not None else 64
    sample_noise = torch.randn((n_samples, *data.images.shape[1:]), generator=g)

    def sample_grid(path):
        ema.copy_to(ema_model)
        x = sampler_diffusion.ddim_sample(sample_noise.shape, steps=args.sample_steps,
                                          noise=sample_noise, y=sample_y, guidance=args.guidance)
        save_grid(x, path, nrow=8)

    @torch.no_grad()
    def validation_loss():
        ema.copy_to(ema_model)
        total = 0.0
        for i in range(0, len(val_idx), 256):
            sl = slice(i, i + 256)
            x0 = val_x0[sl].to(device).contiguous(memory_format=layout)
            y = val_y[sl].to(device) if val_y is not None else None
            total += sampler_diffusion.loss(x0, y, p_uncond=0.0, t=val_t[sl].to(device),
                                            noise=val_noise[sl].to(device)).item() * len(x0)
        return total / len(val_idx)

    def checkpoint(path):
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if main_proc:
            save_checkpoint({"kind": kind, "model_config": model_config,
                             "diffusion": {"timesteps": args.timesteps, "schedule": args.schedule,
                                           "prediction": args.prediction},
                             "model": model.state_dict(), "ema": ema.state_dict(),
                             "optimizer": opt.state_dict(), "state": dict(state), "rng": rngs,
                             "args": plain(args), "num_classes": data.num_classes}, path)

    def end_of_epoch(epoch, train_loss, images_per_s, elapsed):
        """Validation, metrics, pictures, checkpoints, early stopping. Returns True to stop.

        epoch counts finished epochs; after a budget stop it has a fraction, e.g. 3.4."""
        val = validation_loss()
        improved = state["best_val"] - val > args.min_delta
        if improved:
            state["best_val"], state["bad_epochs"] = val, 0
        else:
            state["bad_epochs"] += 1
        rows.append({"epoch": round(epoch, 3), "step": state["step"],
                     "train_loss": train_loss, "val_loss": val, "lr": opt.param_groups[0]["lr"],
                     "images_per_s": images_per_s, "elapsed_s": elapsed})
        if main_proc:
            write_metrics(rows, out_dir / "metrics.csv")
            plot_loss_curve(rows, out_dir / "loss_curve.png")
            sample_grid(out_dir / f"samples_epoch{math.ceil(epoch):03d}.png")
            print(f"epoch {epoch:g} step {state['step']}: train {train_loss:.4f} "
                  f"val {val:.4f}{' (best)' if improved else ''} {images_per_s:.0f} img/s")
        checkpoint(out_dir / "last.pt")
        if improved:
            checkpoint(out_dir / "best.pt")
        return state["bad_epochs"] >= args.patience

    total_steps = args.epochs * batches_per_epoch

    def learning_rate(step, elapsed):
        """Linear warmup, then constant or a cosine decay over the budget's progress in [0, 1].

        The decay spans --epochs, or --max-minutes if that runs out first. --max-steps only
        stops the run, so a run cut short by it and resumed follows the same schedule."""
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        if args.lr_schedule == "cosine":
            progress = step / total_steps
            if args.max_minutes is not None:  # a wall-clock budget may run out first
                progress = max(progress, elapsed / (60 * args.max_minutes))
            lr *= 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return lr

    # Ctrl-C asks the loop to stop at the end of the current step, so last.pt is consistent
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True)) \
        if main_proc and world == 1 else None

    from tqdm.auto import tqdm
    if main_proc:
        print(f"{kind} model: {n_params / 1e6:.2f}M parameters, predicts {args.prediction}, "
              f"{len(train_idx)} training images, {batches_per_epoch} steps per epoch, "
              f"device {device}, {world} process(es), {'bf16 autocast' if bf16 else 'fp32'}")
    start = time.time()
    stop_reason = None
    try:
        while state["epoch"] < args.epochs and stop_reason is None:
            sampler.set_epoch(state["epoch"])
            order = train_idx[torch.tensor(list(sampler))]
            bar = tqdm(range(state["batch_in_epoch"], batches_per_epoch), disable=not main_proc,
                       desc=f"epoch {state['epoch'] + 1}", dynamic_ncols=True)
            epoch_start, epoch_images = time.time(), 0
            model.train()
            for b in bar:
                # data: a batch of uint8 images -> [-1, 1], in the model's layout, augmented
                idx = order[b * args.batch_size:(b + 1) * args.batch_size]
                x0 = to_model_range(images[idx.to(images.device)]).to(device)
                x0 = x0.contiguous(memory_format=layout)
                if augment is not None:
                    x0 = augment(x0)
                y = labels[idx].to(device) if labels is not None else None

                # forward / backward: DDPM Alg. 1 on this batch, t drawn by training_timesteps
                t = training_timesteps(len(x0), args.timesteps, args.t_power, device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = diffusion.loss(x0, y, p_uncond=args.p_uncond, t=t)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    fail(f"the loss became {loss.item()} at step {state['step']} (gradient norm "
                         f"{grad_norm.item()}); training stopped. The last good checkpoint in "
                         f"{out_dir} was kept. Try a lower --lr or a longer --warmup.")

                # optimizer step with the learning-rate schedule, then EMA of the weights
                lr = learning_rate(state["step"], time.time() - start)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
                ema.update(model)

                # logging
                state["step"] += 1
                state["batch_in_epoch"] = b + 1
                state["loss_sum"] += loss.item()
                state["loss_count"] += 1
                epoch_images += len(x0) * world
                images_per_s = epoch_images / (time.time() - epoch_start)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images_per_s:.0f}")

                # stop: budgets and Ctrl-C
                if args.max_steps is not None and state["step"] >= args.max_steps:
                    stop_reason = f"reached --max-steps {args.max_steps}"
                elif args.max_minutes is not None and time.time() - start >= 60 * args.max_minutes:
                    stop_reason = f"reached --max-minutes {args.max_minutes}"
                elif interrupted:
                    stop_reason = "interrupted"
                if world > 1:  # every rank must stop at the same step
                    flag = torch.tensor([stop_reason is not None], device=device, dtype=torch.int)
                    dist.all_reduce(flag)
                    stop_reason = stop_reason or ("another rank stopped" if flag.item() else None)
                if stop_reason:
                    break
            bar.close()

            if stop_reason == "interrupted":  # save at once, skip the pictures
                checkpoint(out_dir / "last.pt")
                break

            # end of epoch (or of the budget): validation, pictures, checkpoint, early stop
            train_loss = state["loss_sum"] / max(state["loss_count"], 1)
            if state["batch_in_epoch"] == batches_per_epoch:  # a whole epoch: reset its counters
                state.update(epoch=state["epoch"] + 1, batch_in_epoch=0, loss_sum=0.0, loss_count=0)
            model.eval()
            progress = state["epoch"] + state["batch_in_epoch"] / batches_per_epoch
            if end_of_epoch(progress, train_loss, images_per_s, time.time() - start) and stop_reason is None:
                stop_reason = f"early stopping: no improvement for {args.patience} epochs"
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    if main_proc:
        print(f"stopped: {stop_reason or f'finished {args.epochs} epochs'}; "
              f"best validation loss {state['best_val']:.4f}")
        if stop_reason == "interrupted":
            print(f"saved {out_dir / 'last.pt'}; continue with --resume {out_dir / 'last.pt'}")
        else:
            sample_grid(out_dir / "samples.png")
            print(f"wrote {out_dir / 'samples.png'}, last.pt, best.pt, metrics.csv, loss_curve.png")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if stop_reason == "interrupted":
        raise SystemExit(130)
    return TrainResult(state, model, ema)
