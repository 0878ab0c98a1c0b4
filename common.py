"""What the scripts share: devices, argument checks, data sets, checkpoints, samplers by name,
pictures and metrics.

The model modules (diffusion.py, diffusion_cifar.py) do not import this file; the scripts do.
Sections: 1. errors, checks and devices, 2. data sets, 3. checkpoints, 4. sampling by name,
pictures and metrics. The training loop is in training.py.
"""

import argparse
import csv
import gzip
import math
import os
import pickle
import struct
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------
# 1. Errors, argument checks and devices


def fail(message):
    """Stop with a clear message and exit status 1: for bad input, never for bugs."""
    raise SystemExit(f"error: {message}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps each script's docstring as written and shows every default as it is used,
    unless the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) or "default" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


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
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"cannot write to {what} {path}: {e.strerror or e}")
    return path


def check_writable_file(path, what, suffixes=None, overwrite=False):
    """An output file, checked before the work: not a folder, one of `suffixes` (e.g. (".png",)),
    in a writable folder (created), and not a checkpoint that it would destroy unless
    `overwrite`. Other files of its own kind (an earlier report) are simply replaced."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        fail(f"{what} {path} is a folder; give a file name")
    check_writable_dir(path.parent, f"the folder of {what}")
    if suffixes and path.suffix.lower() not in suffixes:
        fail(f"{what} {path} must end in {' or '.join(suffixes)}")
    if path.is_file() and not overwrite and is_checkpoint_file(path):
        fail(f"{what} {path} holds a checkpoint, which this would replace; give another path, "
             f"or pass --overwrite to replace it")


def is_checkpoint_file(path):
    """True for a file that torch.save wrote (a zip archive holding data.pkl), whatever its name."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("data.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


SEED_MAX = 2 ** 63 - 1  # torch.manual_seed takes a signed 64-bit integer


def seed_arg(text):
    """argparse type of --seed: an integer in [0, 2^63 - 1], with a one-line error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed must be a whole number, got {text!r}")
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2^63 - 1], got {text}")
    return value


# Sizes a command line or a checkpoint may ask for: far above any real use of these models,
# far below what would exhaust memory. Checked before anything is allocated.
LIMITS = {"timesteps": 100_000, "image_size": 1024, "width": 1024, "levels": 8,
          "time_dim": 4096, "num_classes": 100_000, "num_samples": 1_000_000,
          "reference_size": 100_000, "batch_size": 65_536, "frames": 10_000, "points": 100_000}


def is_whole(value, low, high):
    """True for an int (not a bool) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_range(name, value, low, high):
    """A whole-number argument in [low, high], or one error line naming the flag."""
    if value is not None and not is_whole(value, low, high):
        fail(f"--{name.replace('_', '-')} must be a whole number in [{low:,}, {high:,}], got {value}")


def check_images_finite(x, what="the sampler"):
    """Samples with NaN or inf would become black images and meaningless scores: refuse them."""
    if not torch.isfinite(x).all():
        fail(f"{what} produced non-finite values (NaN or inf): the settings (--eta, --guidance) "
             f"are out of the sampler's range, or the checkpoint's weights are broken")
    return x


def run(main, parse_args):
    """A script's entry point: Ctrl-C anywhere (start-up, sampling, the last picture) ends in
    one line and exit status 130, not a traceback."""
    try:
        main(parse_args())
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)


# ----------------------------------------------------------------------------------------
# 2. Data sets: uint8 tensors (N, C, H, W) in memory, plus labels or None

Dataset = namedtuple("Dataset", "images labels num_classes name")

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


class CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR-10's pickle batches without letting a file run code.

    A pickle may name any importable function, and plain pickle.load calls it: a crafted batch
    file could run a shell command. The real batches hold only a dict of bytes, lists of ints and
    bytes, and one uint8 numpy array, so only the classes that rebuild a numpy array are allowed.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("copy_reg", "_reconstructor"),
               ("copyreg", "_reconstructor")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds "
                                         f"only arrays, lists and bytes")
        return super().find_class(module, name)


DATA_DIR_HELP = ("where data sets are found or downloaded; CIFAR-10 is also read from image "
                 "folders <data-dir>/train/<class>/ and <data-dir>/test/<class>/")


def load_cifar10(data_dir, split="train", download=True):
    """CIFAR-10 from its python pickle batches (cifar-10-batches-py), downloading if missing,
    or from image folders <data_dir>/<split>/<class>/*.png|jpg when those are there."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    image_folder = Path(data_dir) / split
    if not all((folder / f).is_file() for f in files) and image_folder.is_dir():
        data = load_image_folder(image_folder, 32, 3)
        if data.num_classes != 10:
            fail(f"{image_folder} should hold CIFAR-10's ten class folders, found "
                 f"{data.num_classes or 'no'} class folders")
        return data._replace(name="cifar10")
    if not all((folder / f).is_file() for f in files) and download:
        import torchvision
        print(f"CIFAR-10 not found under {data_dir}; downloading with torchvision ...")
        try:
            torchvision.datasets.CIFAR10(str(data_dir), train=(split == "train"), download=True)
        except Exception as e:
            print(f"download failed: {type(e).__name__}: {e}", file=sys.stderr)
    if not all((folder / f).is_file() for f in files):
        fail(f"CIFAR-10 ({split} split) is not in {folder} and could not be downloaded.\n"
             f"Put the python-version batches ({', '.join(files)}) into {folder}/, or the "
             f"images as class folders into {image_folder}/<class>/, or connect to the internet.")
    images, labels = [], []
    for f in files:
        try:
            with open(folder / f, "rb") as fh:
                batch = CifarUnpickler(fh, encoding="bytes").load()  # the data set's own format
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        except Exception as e:
            fail(f"could not read CIFAR-10 batch {folder / f}: {type(e).__name__}: {e}")
    return Dataset(torch.from_numpy(np.concatenate(images)), torch.tensor(labels), 10, "cifar10")


def to_8bit(im):
    """16- and 32-bit grayscale images (PNG mode I;16 or I) scaled to 8 bits. PIL's own convert
    clips them at 255, which turns almost every pixel of a 16-bit image white."""
    from PIL import Image
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray((a / top * 255).round().clip(0, 255).astype(np.uint8), "L")
    return im


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
    from tqdm.auto import tqdm
    for i, p in enumerate(tqdm(files, desc=f"reading {root.name}", disable=len(files) < 5000)):
        try:
            with Image.open(p) as im:
                im = to_8bit(im).convert("L" if channels == 1 else "RGB")
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BICUBIC)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
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
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a
    file. A full disk (or any write error) removes the temporary file and says so in one line."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        fail(f"could not write {path}: {getattr(e, 'strerror', None) or str(e).splitlines()[0]} "
             f"(is the disk at {path.parent.resolve()} full?); {path} itself was not changed")


def load_checkpoint(path, kind=None):
    """Read a checkpoint safely; with `kind`, insist that it holds that model ('mnist', 'cifar').
    Its configuration is checked against LIMITS before any network is built from it."""
    path = Path(path)
    if path.is_dir():
        fail(f"checkpoint {path} is a folder; give the checkpoint file (e.g. {path / 'last.pt'})")
    if not path.is_file():
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a class the safe loader will not rebuild
            fail(f"{path} holds objects other than tensors and plain data; it was refused, "
                 f"because loading it could run code")
        fail(f"could not read checkpoint {path}: it is corrupted or not a checkpoint of this project")
    except Exception as e:
        fail(f"could not read checkpoint {path}: it is corrupted or not a checkpoint "
             f"of this project ({type(e).__name__})")
    # a training checkpoint also holds the raw weights ("model"), the optimizer and the counters;
    # a weights-only file (pretrained/, distill.py's students) holds the EMA weights alone
    needed = {"kind", "model_config", "diffusion", "ema"}
    if not isinstance(ckpt, dict) or not needed <= ckpt.keys() or \
            not all(isinstance(ckpt.get(k, {}), dict) for k in ("model_config", "diffusion", "model", "ema")):
        fail(f"{path} is not a checkpoint of this project (it lacks {sorted(needed)})")
    if not isinstance(ckpt["kind"], str) or ckpt["kind"] not in MODEL_MODULES:
        fail(f"{path} holds an unknown model kind {ckpt['kind']!r}")
    if not isinstance(ckpt.get("args", {}), dict):
        fail(f"{path} is damaged: its training arguments are not a dict")
    if kind is not None and ckpt["kind"] != kind:
        fail(f"{path} is a checkpoint of the {ckpt['kind']} model "
             f"({MODEL_MODULES[ckpt['kind']]}.py); use {TRAIN_SCRIPTS[ckpt['kind']]} with it, "
             f"not this script, which trains the {kind} model")
    check_config(ckpt, path)
    check_weights_finite(ckpt, path)
    check_distilled(ckpt, path)
    return ckpt


def check_config(ckpt, path):
    """What a checkpoint asks to build must be sane and bounded (LIMITS): a tampered file must
    not allocate gigabytes, or fail deep inside torch."""
    cfg, diff = ckpt["model_config"], ckpt["diffusion"]
    whole = is_whole
    problems = []
    if not whole(diff.get("timesteps"), 1, LIMITS["timesteps"]):
        problems.append(f"timesteps {diff.get('timesteps')!r} (a whole number in [1, {LIMITS['timesteps']:,}])")
    if diff.get("schedule") not in ("linear", "cosine"):
        problems.append(f"schedule {diff.get('schedule')!r} (linear or cosine)")
    if diff.get("prediction") not in ("eps", "v"):
        problems.append(f"prediction {diff.get('prediction')!r} (eps or v)")
    if not whole(cfg.get("image_size"), 4, LIMITS["image_size"]):
        problems.append(f"image_size {cfg.get('image_size')!r}")
    if not whole(cfg.get("channels"), 1, 4):
        problems.append(f"channels {cfg.get('channels')!r}")
    if cfg.get("num_classes") is not None and not whole(cfg["num_classes"], 1, LIMITS["num_classes"]):
        problems.append(f"num_classes {cfg['num_classes']!r}")
    if ckpt["kind"] == "mnist":
        dims = cfg.get("hidden_dims")
        if not (isinstance(dims, list) and 1 <= len(dims) <= LIMITS["levels"]
                and all(whole(h, 1, LIMITS["width"]) for h in dims)):
            problems.append(f"hidden_dims {dims!r} (1 to {LIMITS['levels']} widths, each at most {LIMITS['width']})")
        if not whole(cfg.get("time_dim"), 2, LIMITS["time_dim"]):
            problems.append(f"time_dim {cfg.get('time_dim')!r}")
    else:
        mult, base = cfg.get("channel_mult"), cfg.get("base_channels")
        if not (whole(base, 1, LIMITS["width"]) and isinstance(mult, list) and 1 <= len(mult) <= LIMITS["levels"]
                and all(whole(m, 1, LIMITS["width"] // base) for m in mult)):
            problems.append(f"base_channels {base!r} x channel_mult {mult!r} (widths at most {LIMITS['width']})")
        if not whole(cfg.get("num_res_blocks"), 1, 8):
            problems.append(f"num_res_blocks {cfg.get('num_res_blocks')!r}")
    if problems:
        fail(f"{path} is damaged or not of this project: its configuration asks for " + "; ".join(problems))


def check_weights_finite(ckpt, path):
    """NaN or inf weights would sample black images and train on with a NaN loss: refuse them."""
    ema = ckpt["ema"].get("shadow") if isinstance(ckpt["ema"], dict) else None
    tensors = {"model": ckpt.get("model", {}), "EMA": ema}
    for part, state in tensors.items():
        if not isinstance(state, dict):
            fail(f"{path} is damaged: its {part} weights are not a state dict")
        for name, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
                fail(f"{path} holds non-finite (NaN or inf) {part} weights in {name}: the run "
                     f"that wrote it diverged or the file is damaged; use an earlier checkpoint")


def check_distilled(ckpt, path):
    """A student of progressive distillation records its step count, which must fit its T."""
    if "distilled" not in ckpt:
        return
    d, T = ckpt["distilled"], ckpt["diffusion"]["timesteps"]
    if not (isinstance(d, dict) and is_whole(d.get("steps"), 1, T)):
        fail(f"{path} is damaged: its distillation record {d!r} lacks a step count in [1, {T}]")


def distilled_steps(ckpt):
    """The step count of a distilled student (distill.py), or None for any other checkpoint."""
    return ckpt["distilled"]["steps"] if "distilled" in ckpt else None


def check_student(n, sampler, steps, eta=0.0, spacing=None):
    """A distilled student (n: its step count, distilled_steps; None for any other model) learned
    one thing: its own n DDIM steps (eta 0) on the grid of diffusion.distilled_timesteps. Any
    other sampler or step count is refused before any work."""
    if n is not None and (sampler != "ddim" or steps != n or eta != 0 or spacing not in (None, "distilled")):
        fail(f"this checkpoint is a {n}-step student of progressive distillation (distill.py): it "
             f"samples only with its own {n} DDIM steps (--sampler ddim --steps {n}, eta 0), not "
             f"{sampler_label(sampler, steps, eta, spacing)}")


def refuse_student(ckpt, path, needs):
    """For scripts that ask a model at timesteps of their own choosing: a student knows only its grid."""
    n = distilled_steps(ckpt)
    if n is not None:
        fail(f"{path} is a {n}-step distilled student: it learned only its own {n} steps, and this "
             f"script {needs}; give it the student's teacher instead")


def make_diffusion(module, model, model_config, timesteps, schedule, prediction, p_self_cond=0.5,
                   generator=None):
    """The process of a model module for `model`: its SelfConditionedDiffusion when the network
    is self-conditioned (model_config["self_cond"]), else the plain GaussianDiffusion."""
    if model_config.get("self_cond"):
        return module.SelfConditionedDiffusion(model, timesteps, schedule, prediction, p_self_cond,
                                               generator)
    return module.GaussianDiffusion(model, timesteps, schedule, prediction)


def model_from_checkpoint(ckpt, device):
    """Rebuild (model, diffusion, module) from a checkpoint's stored config and EMA weights
    (float32, also from a float16 file). A distilled student gets the plain process, whose
    network sees no x0 estimate (distill.py says why), and diffusion.distilled_steps = N,
    which common.sample holds it to."""
    import importlib
    module = importlib.import_module(MODEL_MODULES[ckpt["kind"]])
    try:
        model = module.DiffusionModel(**ckpt["model_config"])
        model.load_state_dict(ckpt["ema"]["shadow"])  # copies, and casts float16 to float32
    except (TypeError, RuntimeError, KeyError, ValueError) as e:
        fail(f"the checkpoint's weights do not fit its model config: {str(e).splitlines()[0]}")
    model.to(device).eval()
    n = distilled_steps(ckpt)
    config = {**ckpt["model_config"], "self_cond": False} if n else ckpt["model_config"]
    try:
        diffusion = make_diffusion(module, model, config, p_self_cond=1.0, **ckpt["diffusion"]).to(device)
    except (TypeError, ValueError) as e:
        fail(f"the checkpoint's diffusion settings are not valid: {e}")
    diffusion.distilled_steps = n
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
           noise=None, progress=False, spacing=None):
    """Images in [-1, 1] from the named sampler of a model module's GaussianDiffusion.
    spacing: 'uniform' or 'logsnr' timesteps for ddim and dpm++; None keeps each one's default."""
    kw = dict(y=y, guidance=guidance, generator=generator, noise=noise, progress=progress)
    n = getattr(diffusion, "distilled_steps", None)
    if n is not None:  # a student: its own grid, unclipped, as distill.py trained it
        check_student(n, sampler, steps, eta, spacing)
        return check_images_finite(diffusion.ddim_sample(shape, steps=n, spacing="distilled",
                                                         clip_x0=False, **kw))
    if sampler == "ddpm":
        return check_images_finite(diffusion.ddpm_sample(shape, **kw))
    if spacing is not None:
        kw["spacing"] = spacing
    if sampler == "ddim":
        return check_images_finite(diffusion.ddim_sample(shape, steps=steps, eta=eta, **kw))
    if sampler == "dpm++":
        return check_images_finite(diffusion.dpm_solver_sample(shape, steps=steps, **kw))
    raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")


def sampler_label(sampler, steps, eta=0.0, spacing=None):
    """A short human name: 'DDPM-1000', 'DDIM-50', 'DDIM-50 eta=1', 'DPM-Solver++ 10'."""
    if sampler == "ddpm":
        return f"DDPM-{steps}"
    name = f"DDIM-{steps}" + (f" eta={eta:g}" if eta else "") if sampler == "ddim" else f"DPM-Solver++ {steps}"
    return name + (f" ({spacing} t)" if spacing else "")


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


def plot_loss_curve(rows, path, prediction="eps", train_log=None, stable_targets=False):
    """Validation loss per epoch (metrics.csv rows) and the training loss, either per epoch or,
    from train_log = {step: smoothed loss}, every few dozen steps. stable_targets: the training
    loss was measured against them (the validation loss never is), which the legend says."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    note = ", against stable targets" if stable_targets else ""
    if train_log:
        steps = sorted(train_log)
        ax.plot(steps, [train_log[k] for k in steps], "-", label=f"train (smoothed{note})")
    else:
        ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], "o-", label=f"train{note}")
    ax.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], "s-",
            label="validation (EMA weights, fixed t and noise)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"MSE of the predicted {'noise eps' if prediction == 'eps' else 'velocity v'}")
    if stable_targets:  # the two curves measure different targets: say so where the eye falls
        ax.set_title("Training loss against stable targets, validation against the usual target:\n"
                     "the stable target is less noisy, so the gap is not overfitting", fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


METRIC_FIELDS = ["epoch", "step", "train_loss", "val_loss", "lr", "images_per_s", "elapsed_s"]


def read_metrics(path):
    """The rows of a metrics.csv as dicts of floats; a damaged file is a clear error."""
    if not Path(path).is_file():
        return []
    try:
        with open(path, newline="") as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        if rows and set(rows[0]) != set(METRIC_FIELDS):
            raise ValueError(f"columns {sorted(rows[0])}")
        return rows
    except (ValueError, TypeError, OSError, csv.Error) as e:
        fail(f"{path} is damaged ({e}); move it away to resume with fresh metrics")


def write_metrics(rows, path):
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, METRIC_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (int(r[k]) if k == "step" else r[k]) for k in METRIC_FIELDS})
    os.replace(tmp, path)
