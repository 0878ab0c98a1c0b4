"""Tiny data sets in the real on-disk formats, written by the tests themselves."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def tiny_mnist_args(timesteps=50, sample_steps=5):
    """train_diffusion.py arguments for a network small enough to train in a second."""
    return ["--hidden-dims", "8", "16", "16", "--time-dim", "16", "--batch-size", "16",
            "--val-size", "16", "--timesteps", str(timesteps), "--sample-steps", str(sample_steps),
            "--device", "cpu", "--warmup", "2", "--eval-share", "1"]  # validate every epoch


def write_idx(path, array, compress=True):
    """Write a uint8 array as an IDX file (the MNIST format), optionally gzipped."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def digit_like_images(n, seed=0, size=28):
    """n images of the digit glyphs 0-9 (PIL's built-in font, scaled up), jittered and noisy."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    glyphs = []
    for d in range(10):
        im = Image.new("L", (12, 16), 0)
        ImageDraw.Draw(im).text((2, 1), str(d), fill=255, font=font)
        glyphs.append(np.asarray(im.resize((18, 24), Image.BILINEAR)))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = np.zeros((n, size, size), np.uint8)
    for i, y in enumerate(labels):
        dy, dx = rng.integers(0, size - 24 + 1), rng.integers(0, size - 18 + 1)
        images[i, dy:dy + 24, dx:dx + 18] = glyphs[y]
    images = np.clip(images.astype(int) + rng.integers(0, 30, images.shape), 0, 255).astype(np.uint8)
    return images, labels


def write_mnist(root, n_train=96, n_test=40, folder="MNIST/raw", compress=True):
    """A tiny MNIST in torchvision's layout: root/MNIST/raw/{train,t10k}-{images,labels}-..."""
    raw = Path(root) / folder
    raw.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if compress else ""
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = digit_like_images(n, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", x, compress)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", y, compress)
    return Path(root)


def write_image_folder(root, n_per_class=12, classes=("circles", "squares"), size=20):
    """PNGs of different sizes, in colour, one sub-folder per class."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            s = int(size + rng.integers(0, 12))
            im = Image.new("RGB", (s, s), (0, 0, 0))
            draw = ImageDraw.Draw(im)
            box = [s // 4, s // 4, 3 * s // 4, 3 * s // 4]
            (draw.ellipse if k == 0 else draw.rectangle)(box, fill=(255, int(rng.integers(0, 255)), 0))
            im.save(d / f"{i}.png")
    return Path(root)


def write_cifar10(root, n_per_batch=20, n_test=20):
    """A tiny CIFAR-10 in its python pickle-batch layout: root/cifar-10-batches-py/."""
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_per_batch
        labels = rng.integers(0, 10, n).tolist()
        data = np.zeros((n, 3, 32, 32), np.uint8)
        for i, y in enumerate(labels):
            data[i, y % 3, 8:24, 2 + 2 * y:8 + 2 * y] = 250
        data = data.reshape(n, 3072)
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{i}.png".encode() for i in range(n)]}, f)
    return Path(root)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_cifar10_jpeg(root, n_train=12, n_test=6, classes=CIFAR10_CLASSES):
    """A tiny CIFAR-10 in the image-folder layout of ../shared/data/cifar10:
    root/{train,test}/<class>/NNNN.jpg, 32x32 RGB JPEGs. Class k is a square of its own colour
    on a dark background, at a random place, so that a classifier can learn it."""
    from PIL import Image
    rng = np.random.default_rng(0)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
               (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 190, 212), (255, 255, 255)]
    for split, n in (("train", n_train), ("test", n_test)):
        for k, name in enumerate(classes):
            d = Path(root) / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
                y, x = rng.integers(2, 14, 2)
                a[y:y + 16, x:x + 16] = palette[k % len(palette)]
                Image.fromarray(a).save(d / f"{i:04d}.jpg", quality=90)
    return Path(root)


# Denoisers with known answers ------------------------------------------------------------


class OneImageDenoiser:
    """The exact denoiser when the data set is the single image x_star:
    eps(x_t, t) = (x_t - sqrt(abar_t) x_star) / sqrt(1 - abar_t), or with prediction="v" the
    exact v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_star. It counts its calls."""

    def __init__(self, diffusion, x_star, prediction="eps"):
        self.d, self.x_star, self.prediction, self.calls, self.ts = diffusion, x_star, prediction, 0, []

    def __call__(self, x, t, y=None):
        self.calls += 1
        self.ts.append(int(t[0]))
        abar = self.d.alphas_cumprod[t].view(-1, 1, 1, 1).double()
        eps = (x.double() - abar.sqrt() * self.x_star) / (1 - abar).sqrt()
        return as_prediction(eps, self.x_star, abar, self.prediction)


class GaussianDenoiser:
    """The exact denoiser for data ~ N(mu, s^2 I): x_t ~ N(sqrt(abar) mu, abar s^2 + 1 - abar),
    so E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar) and
    E[x0 | x_t] = mu + sqrt(abar) s^2 (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""

    def __init__(self, diffusion, mu, s, prediction="eps"):
        self.d, self.mu, self.s, self.prediction = diffusion, mu, s, prediction

    def __call__(self, x, t, y=None):
        abar = self.d.alphas_cumprod[t].view(-1, 1, 1, 1).double()
        r = (x.double() - abar.sqrt() * self.mu) / (abar * self.s ** 2 + 1 - abar)
        eps = (1 - abar).sqrt() * r
        x0 = self.mu + abar.sqrt() * self.s ** 2 * r
        return as_prediction(eps, x0, abar, self.prediction)


def as_prediction(eps, x0, abar, prediction):
    """eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), as float32."""
    if prediction == "v":
        return (abar.sqrt() * eps - (1 - abar).sqrt() * x0).float()
    return eps.float()
