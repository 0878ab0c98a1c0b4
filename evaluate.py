"""Measure sample quality: FID, confident share and class coverage.

  python evaluate.py train-classifier --dataset mnist           # once: the feature network
  python evaluate.py --checkpoint runs/mnist/best.pt --num-samples 1000
  python evaluate.py --samples samples.npz --dataset mnist --json report.json
  python evaluate.py --baseline blur --dataset cifar10 --features classifier   # a reference score

MNIST and Fashion-MNIST are scored in the feature space of a small classifier that this script
trains (its own test accuracy is reported). CIFAR-10 uses the standard Inception FID from the
optional package pytorch-fid (pip install pytorch-fid) against the training set where it can,
or with --features classifier the same kind of classifier, trained on CIFAR-10: that is a
classifier-feature FID, comparable only with other classifier-feature FIDs.
Samples come from an .npz (key arr_0, uint8, N x H x W x C, as OpenAI's evaluator reads), a
folder of PNGs, or a checkpoint; --baseline scores real, blurred or noise images the same way.
"""

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

SHAPES = {"mnist": (28, 28, 1), "fashion-mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


# ----------------------------------------------------------------------------------------
# The Frechet distance


def gaussian_stats(features):
    """Mean and covariance of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), Heusel et al. 2017.

    Tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    which is symmetric and positive semi-definite, so numpy's eigh suffices (no scipy).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    w, v = np.linalg.eigh(sigma1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_s1 @ sigma2 @ sqrt_s1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    return max(fid, 0.0)  # a true distance is >= 0; tiny negatives are round-off


# ----------------------------------------------------------------------------------------
# The feature networks: a small CNN for MNIST-like data, a deeper one for CIFAR-10


class FeatureNetwork(nn.Module):
    """A classifier whose `body` gives the features for FID and whose `head` gives the classes."""

    def forward(self, x):
        return self.head(self.body(x))

    @torch.no_grad()
    def features_and_probs(self, x):
        f = self.body(x)
        return f, F.softmax(self.head(f), dim=1)


class Classifier(FeatureNetwork):
    """A small CNN. Its 128-d penultimate layer is the feature space for FID."""

    def __init__(self, channels=1, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(32),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(64), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(128), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, num_classes))


class CifarClassifier(FeatureNetwork):
    """A small VGG-style CNN for CIFAR-10, 0.66M parameters: 88.0% test accuracy after its 15
    default epochs (about 25 minutes on 2 CPU cores). Its 192-d penultimate layer (the max over
    positions of the last block) is the feature space for the classifier-feature FID."""

    def __init__(self, channels=3, num_classes=10, widths=(32, 48, 96, 192)):
        super().__init__()

        def conv(cin, cout):  # 3x3 convolution, BatchNorm, GELU
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]

        stem, *stages = widths
        layers, cin = conv(channels, stem), stem
        for w in stages:  # 32x32 -> 16x16 -> 8x8 -> 4x4, two convolutions per stage
            layers += conv(cin, w) + [nn.MaxPool2d(2)] + conv(w, w)
            cin = w
        self.body = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)


def random_affine(x, degrees=12.0, scale=0.1, shift=2.0):
    """Augmentation: a random rotation, scale and shift for each image (background stays -1),
    so that the classifier judges shape, as a classifier trained on all of MNIST would."""
    B, _, H, W = x.shape
    angle = (torch.rand(B, device=x.device) * 2 - 1) * math.radians(degrees)
    s = 1 + (torch.rand(B, device=x.device) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    t = (torch.rand(B, 2, device=x.device) * 2 - 1) * shift * 2 / H  # pixels -> [-1, 1] units
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, x.shape, align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def default_classifier_path(dataset):
    return Path("runs") / "classifiers" / f"{dataset}.pt"


def uint8_nhwc_to_model(images):
    """uint8 (N, H, W, C) numpy -> float (N, C, H, W) torch in [-1, 1]."""
    return common.to_model_range(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))


@torch.no_grad()
def classify(clf, images, device, batch_size=500):
    """(features (N, 128), probabilities (N, 10)) for uint8 NHWC images."""
    clf.eval()
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
        x = uint8_nhwc_to_model(images[i:i + batch_size]).to(device)
        f, p = clf.features_and_probs(x)
        feats.append(f.cpu())
        probs.append(p.cpu())
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def dataset_nhwc(dataset, data_dir, split):
    data = common.load_dataset(dataset, data_dir, SHAPES[dataset][0], SHAPES[dataset][2], split)
    return data.images.permute(0, 2, 3, 1).numpy(), data.labels.numpy()


def random_crop_flip(x, pad=4):
    """Augmentation for CIFAR-10: each image shifted by up to `pad` pixels (reflected at the
    border) and flipped left-right with probability 1/2."""
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B, 1), device=x.device)
    rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded.permute(0, 2, 3, 1)[torch.arange(B, device=x.device)[:, None, None], rows, cols]
    out = out.permute(0, 3, 1, 2)  # (B, C, H, W)
    flip = torch.rand(B, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, out.flip(3), out).contiguous(memory_format=torch.channels_last)


# How each feature network is trained: batch, optimizer, augmentation, default epochs, and
# the test accuracy below which its FID and confidence figures should not be trusted.
CLASSIFIER_RECIPES = {
    "mnist": dict(batch=128, sgd=False, lr=2e-3, weight_decay=1e-4, label_smoothing=0.0,
                  augment=random_affine, epochs=3, min_accuracy=0.95),
    "cifar10": dict(batch=256, sgd=True, lr=0.2, weight_decay=5e-4, label_smoothing=0.1,
                    augment=random_crop_flip, epochs=15, min_accuracy=0.85),
}
CLASSIFIER_RECIPES["fashion-mnist"] = dict(CLASSIFIER_RECIPES["mnist"], min_accuracy=0.88)


def make_classifier(dataset):
    return CifarClassifier() if dataset == "cifar10" else Classifier(channels=1)


def train_classifier(args):
    """Train the feature network on the training split; cache test-split reference statistics."""
    from tqdm.auto import tqdm
    recipe = CLASSIFIER_RECIPES[args.dataset]
    epochs = args.epochs or recipe["epochs"]
    batch = args.batch_size or recipe["batch"]
    lr = recipe["lr"] * batch / recipe["batch"]  # the learning rate scales with the batch
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)
    start = time.perf_counter()
    train_x, train_y = dataset_nhwc(args.dataset, args.data_dir, "train")
    test_x, test_y = dataset_nhwc(args.dataset, args.data_dir, "test")
    clf = make_classifier(args.dataset).to(device, memory_format=torch.channels_last)
    if recipe["sgd"]:  # the usual recipe for a BatchNorm CNN on CIFAR-10
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=True,
                              weight_decay=recipe["weight_decay"])
    else:
        opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=recipe["weight_decay"])
    x_all = uint8_nhwc_to_model(train_x)
    y_all = torch.from_numpy(train_y)
    for split, labels in (("training", train_y), ("test", test_y)):
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < 10):
            common.fail(f"the {split} labels run from {int(labels.min())} to {int(labels.max())}; "
                        f"the classifier has 10 classes (0 to 9)")
    steps = epochs * math.ceil(len(x_all) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    bar = tqdm(total=steps, desc=f"classifier ({args.dataset}, {epochs} epochs)")
    for epoch in range(epochs):
        clf.train()
        perm = torch.randperm(len(x_all))
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            x = recipe["augment"](x_all[idx].to(device))
            loss = F.cross_entropy(clf(x), y_all[idx].to(device),
                                   label_smoothing=recipe["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    feats, probs = classify(clf, test_x, device)
    accuracy = float((probs.argmax(1) == test_y).mean())
    mu, sigma = gaussian_stats(feats)
    out = Path(args.out or default_classifier_path(args.dataset))
    out.parent.mkdir(parents=True, exist_ok=True)
    common.save_checkpoint({"kind": "classifier", "dataset": args.dataset,
                            "state": {k: v.cpu() for k, v in clf.state_dict().items()},
                            "test_accuracy": accuracy, "num_test": len(test_y),
                            "ref_mu": torch.from_numpy(mu), "ref_sigma": torch.from_numpy(sigma)}, out)
    minutes = (time.perf_counter() - start) / 60
    print(f"classifier test accuracy {accuracy:.4f} on {len(test_y)} {args.dataset} test images "
          f"after {epochs} epochs ({minutes:.1f} min); saved {out}")
    if accuracy < recipe["min_accuracy"]:
        print(f"warning: a weak classifier makes FID and confidence figures unreliable; "
              f"train longer (--epochs {2 * epochs} or more)", file=sys.stderr)
    return {"test_accuracy": accuracy, "path": str(out), "minutes": minutes}


def load_classifier(path, dataset, device):
    path = Path(path)
    if not path.is_file():
        common.fail(f"no classifier at {path}; train one first: "
                    f"python evaluate.py train-classifier --dataset {dataset}")
    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(c, dict) and c.get("kind") == "classifier"
        clf = make_classifier(c["dataset"])
        clf.load_state_dict(c["state"])
    except Exception as e:
        common.fail(f"{path} is not a classifier file of this project ({type(e).__name__})")
    if c["dataset"] != dataset:
        common.fail(f"{path} was trained on {c['dataset']}, not {dataset}")
    return clf.to(device).eval(), c


# ----------------------------------------------------------------------------------------
# Loading samples: .npz, a folder of PNGs, or a checkpoint


def check_samples(images, dataset, source):
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        common.fail(f"{source}: samples must be uint8 in [0, 255], got {dtype}")
    if images.ndim != 4:
        common.fail(f"{source}: samples must be N x H x W x C, got shape {images.shape}")
    if dataset is not None and images.shape[1:] != SHAPES[dataset]:
        common.fail(f"{source}: {dataset} samples must be N x {' x '.join(map(str, SHAPES[dataset]))}, "
                    f"got {images.shape}")
    if len(images) < 2:
        common.fail(f"{source}: need at least 2 samples for statistics, got {len(images)}")
    return images


def load_npz(path):
    path = Path(path)
    if not path.is_file():
        common.fail(f"samples file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "arr_0" not in z:
                common.fail(f"{path} has no arr_0 (keys: {', '.join(z.files)})")
            return z["arr_0"]
    except Exception as e:  # a truncated or foreign file fails in zipfile, numpy or pickle
        common.fail(f"could not read {path} as .npz: {type(e).__name__}: {e}")


def load_png_folder(path, channels):
    from PIL import Image
    files = sorted(Path(path).glob("*.png"))
    if not files:
        common.fail(f"no .png files in {path}")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"), np.uint8)
        except (OSError, Image.DecompressionBombError) as e:
            common.fail(f"could not read {f}: {e}")
        out.append(a[..., None] if channels == 1 else a)
    if len({a.shape for a in out}) != 1:
        common.fail(f"the PNGs in {path} differ in size")
    return np.stack(out)


def save_npz(images, path):
    np.savez(path, arr_0=images)


@torch.no_grad()
def sample_from_checkpoint(ckpt, num_samples, sampler, steps, batch_size, device, seed,
                           guidance=None, eta=0.0, class_id=None, spacing=None):
    """Draw uint8 NHWC samples from a checkpoint's EMA weights; also the requested labels."""
    from tqdm.auto import tqdm
    model, diffusion, _ = common.model_from_checkpoint(ckpt, device)
    model.to(memory_format=torch.channels_last)
    cfg = ckpt["model_config"]
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    num_classes = cfg.get("num_classes")
    guidance = ckpt.get("args", {}).get("guidance", 1.0) if guidance is None else guidance
    g = torch.Generator().manual_seed(seed)
    steps = diffusion.num_timesteps if sampler == "ddpm" else steps  # DDPM always takes all T
    images, labels = [], []
    for i in tqdm(range(0, num_samples, batch_size), desc=f"sampling {common.sampler_label(sampler, steps, eta, spacing)}"):
        n = min(batch_size, num_samples - i)
        y = None
        if num_classes:
            y = (torch.full((n,), class_id) if class_id is not None
                 else torch.arange(i, i + n) % num_classes).to(device)
            labels.append(y.cpu())
        x = common.sample(diffusion, sampler, (n, *shape), steps, eta, y, guidance, generator=g,
                          spacing=spacing)
        images.append(common.to_uint8(x).permute(0, 2, 3, 1).cpu())
    labels = torch.cat(labels).numpy() if labels else None
    return torch.cat(images).numpy(), labels


# ----------------------------------------------------------------------------------------
# Scoring


def class_report(probs, requested=None, threshold=0.9):
    pred = probs.argmax(1)
    hist = np.bincount(pred, minlength=probs.shape[1])
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    report = {"confident_share": float((probs.max(1) >= threshold).mean()),
              "class_histogram": hist.tolist(), "class_entropy_bits": entropy,
              "class_entropy_max_bits": math.log2(probs.shape[1])}
    if requested is not None:
        report["requested_class_share"] = float((pred == requested).mean())
    return report


def save_unsure_grid(images, probs, path, n=32, threshold=0.9):
    """A figure of the n samples the classifier is least sure of (the lowest top probability),
    each titled with its most probable class and that probability: what the samples outside
    the confident share look like. Returns their indices, least sure first."""
    top = probs.max(1)
    order = np.argsort(top, kind="stable")[:n]
    plt = common.pyplot()
    cols = 8
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        common.show_image(ax, uint8_nhwc_to_model(images[i:i + 1])[0])
        ax.set_title(f"{probs[i].argmax()}: {top[i]:.2f}", fontsize=8)
    fig.suptitle(f"the {len(order)} of {len(images)} samples the classifier is least sure of "
                 f"(class: probability); {100 * (top < threshold).mean():.1f}% are below {threshold}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return order


def score_with_classifier(images, dataset, classifier_path, device, requested=None, unsure_path=None):
    """FID in the project classifier's features against the test split, and its class report.
    unsure_path: also save_unsure_grid there."""
    clf, c = load_classifier(classifier_path, dataset, device)
    feats, probs = classify(clf, images, device)
    if unsure_path:
        save_unsure_grid(images, probs, unsure_path)
    mu, sigma = gaussian_stats(feats)
    fid = frechet_distance(mu, sigma, c["ref_mu"].numpy(), c["ref_sigma"].numpy())
    label = f"project {dataset} classifier ({feats.shape[1]}-d), against its {c['num_test']} test images"
    if dataset == "cifar10":
        label = "classifier-feature FID, NOT Inception FID: " + label
    return {"fid": fid, "fid_features": label,
            "classifier_test_accuracy": c["test_accuracy"], **class_report(probs, requested)}


def score_inception(images, args, device):
    """Inception FID (pytorch-fid) against the CIFAR-10 training set, statistics cached."""
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        common.fail("Inception FID needs the optional package pytorch-fid (pip install pytorch-fid); "
                    "offline, use --features classifier")
    if len(images) < 10000:
        print(f"warning: FID from {len(images)} samples is biased upward; the standard is "
              f"50,000 (at least 10,000)", file=sys.stderr)
    try:
        net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
    except Exception as e:  # the weights are downloaded on first use
        common.fail(f"could not load the Inception weights ({type(e).__name__}: {e}); offline, "
                    f"use --features classifier")

    @torch.no_grad()
    def feats(x):
        out = []
        for i in range(0, len(x), 200):
            b = torch.from_numpy(np.ascontiguousarray(x[i:i + 200])).permute(0, 3, 1, 2).float() / 255
            out.append(net(b.to(device))[0].squeeze(-1).squeeze(-1).cpu())
        return torch.cat(out).numpy()

    cache = Path(args.data_dir) / "cifar10_train_inception_stats.npz"
    if cache.is_file():
        with np.load(cache) as z:
            ref_mu, ref_sigma = z["mu"], z["sigma"]
    else:
        ref, _ = dataset_nhwc("cifar10", args.data_dir, "train")
        ref_mu, ref_sigma = gaussian_stats(feats(ref))
        np.savez(cache, mu=ref_mu, sigma=ref_sigma)
    mu, sigma = gaussian_stats(feats(images))
    return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
            "fid_features": "Inception-v3 pool3 (pytorch-fid), against the training set"}


def feature_space(dataset, features):
    """'inception' or 'classifier'. MNIST-like data has only the classifier; CIFAR-10 uses
    Inception where pytorch-fid is installed, unless told otherwise."""
    if features == "auto":
        if dataset != "cifar10":
            return "classifier"
        if importlib.util.find_spec("pytorch_fid") is not None:
            return "inception"
        print("pytorch-fid is not installed: scoring in the project classifier's features "
              "(--features classifier)", file=sys.stderr)
        return "classifier"
    if features == "inception" and dataset != "cifar10":
        common.fail("--features inception is for cifar10; MNIST-like data is scored by the project classifier")
    return features


def add_feature_args(p):
    """--classifier and --features, for every script that scores images with this module."""
    p.add_argument("--classifier", default=None, help="default runs/classifiers/<dataset>.pt")
    p.add_argument("--features", choices=["auto", "classifier", "inception"], default="auto",
                   help="FID feature space. classifier: the project classifier (train-classifier); "
                        "inception: the standard Inception FID (pytorch-fid, cifar10 only); auto: "
                        "inception for cifar10 where pytorch-fid is installed, else classifier")


def check_feature_network(dataset, args, device):
    """A missing or wrong classifier is an error before minutes of sampling, not after. Fixes
    args.features to the space chosen, so that an automatic choice is announced once."""
    space = args.features = feature_space(dataset, args.features)
    if space == "classifier":
        load_classifier(args.classifier or default_classifier_path(dataset), dataset, device)
    elif getattr(args, "save_unsure", None):
        common.fail("--save-unsure needs the project classifier's probabilities; add --features classifier")


def evaluate_images(images, dataset, args, device, requested=None):
    """The report for uint8 NHWC images of `dataset`."""
    report = {"dataset": dataset, "num_samples": int(len(images))}
    if feature_space(dataset, args.features) == "inception":
        report.update(score_inception(images, args, device))
    else:
        path = args.classifier or default_classifier_path(dataset)
        report.update(score_with_classifier(images, dataset, path, device, requested,
                                            getattr(args, "save_unsure", None)))
    return report


# ----------------------------------------------------------------------------------------
# Baselines: what real images, blurred images and noise score, so that a number means something


BASELINES = {
    "train": "real training images: the ceiling a perfect generator of the training set reaches",
    "test": "real test images, the reference set itself (FID then measures only sample-size bias)",
    "blur": "real training images at half resolution and back (16x16 for CIFAR-10): colours and "
            "layout right, details gone",
    "noise": "uniform noise: the floor",
}


def baseline_images(name, dataset, data_dir, n, seed=0):
    """n uint8 NHWC images of baseline `name` (see BASELINES), the same ones for the same seed."""
    H, W, C = SHAPES[dataset]
    rng = np.random.default_rng(seed)
    if name == "noise":
        return rng.integers(0, 256, (n, H, W, C), dtype=np.uint8)
    images, _ = dataset_nhwc(dataset, data_dir, "test" if name == "test" else "train")
    if n > len(images):
        common.fail(f"--num-samples {n} is more than the {len(images)} images of the split")
    images = images[rng.permutation(len(images))[:n]]
    if name == "blur":
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        small = F.interpolate(x, size=(H // 2, W // 2), mode="area")  # the mean of each 2x2 block
        x = F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.ascontiguousarray(images)


def print_report(report):
    width = max(len(k) for k in report)
    print("-" * (width + 30))
    for k, v in report.items():
        v = f"{v:.4f}" if isinstance(v, float) else v
        print(f"{k:<{width}}  {v}")
    print("-" * (width + 30))


# ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-classifier"]:
        p = argparse.ArgumentParser(description="Train the feature network for FID and the confident share.",
                                    formatter_class=common.HelpFormatter)
        p.add_argument("--dataset", choices=sorted(CLASSIFIER_RECIPES), default="mnist",
                       help="the data set the classifier learns")
        p.add_argument("--data-dir", default="./data", help=common.DATA_DIR_HELP)
        p.add_argument("--epochs", type=int, default=None,
                       help="training epochs (default 3 for MNIST-like data, 40 for the figures in "
                            "RESULTS.md; 15 for CIFAR-10)")
        p.add_argument("--batch-size", type=int, default=None,
                       help="images per step (default 128 for MNIST-like data, 256 for CIFAR-10); "
                            "the learning rate scales with it")
        p.add_argument("--out", default=None, help="default runs/classifiers/<dataset>.pt")
        p.add_argument("--overwrite", action="store_true", help="replace the file at --out")
        p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
        p.add_argument("--seed", type=common.seed_arg, default=0, help="random seed")
        args = p.parse_args(argv[1:])
        args.command = "train-classifier"
        return args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", help="an .npz (arr_0: uint8 N x H x W x C) or a folder of PNGs")
    src.add_argument("--checkpoint", help="draw samples from this checkpoint's EMA weights")
    src.add_argument("--baseline", choices=list(BASELINES),
                     help="score a reference instead of samples: " +
                          "; ".join(f"{k}: {v}" for k, v in BASELINES.items()))
    p.add_argument("--dataset", choices=sorted(SHAPES), default=None,
                   help="what the samples imitate (default: from the checkpoint, else mnist)")
    p.add_argument("--data-dir", default="./data", help=common.DATA_DIR_HELP)
    add_feature_args(p)
    p.add_argument("--sampler", choices=common.SAMPLERS, default="ddim",
                   help="ddpm: all T steps; ddim: --steps with --eta; dpm++: DPM-Solver++(2M), "
                        "--steps (20 steps gave DDIM-50's confident share in RESULTS.md)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps for ddim and dpm++ (default 50; a distilled student's own count)")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise: 0 deterministic, 1 as much as DDPM (ddim only)")
    p.add_argument("--spacing", choices=["uniform", "logsnr"], default=None,
                   help="where ddim and dpm++ evaluate: evenly in t or in log-SNR (default: uniform "
                        "for ddim, logsnr for dpm++)")
    p.add_argument("--guidance", type=float, default=None, help="default: the training setting")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples to draw (default 50000 for CIFAR-10, 10000 otherwise; "
                        "1000 for --baseline)")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampler call")
    p.add_argument("--save-npz", default=None, help="also save the drawn samples here")
    p.add_argument("--save-grid", default=None, help="also save the first 64 images as a PNG grid here")
    p.add_argument("--save-unsure", default=None,
                   help="also save a PNG of the 32 samples the classifier is least sure of, each "
                        "with its class and probability (needs the classifier's features)")
    p.add_argument("--json", default=None, help="write the report here as JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="let an output path replace a checkpoint that is there (refused by default)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=common.seed_arg, default=0, help="random seed")
    p.add_argument("--out-dir", default=None, help="also write report.json into this folder")
    args = p.parse_args(argv)
    args.command = "evaluate"
    return args


def main(args):
    if args.command == "train-classifier":
        if (args.epochs is not None and args.epochs < 1) or (args.batch_size is not None and args.batch_size < 1):
            common.fail("--epochs and --batch-size must be at least 1")
        # before 25 minutes of training, not after: a classifier never silently replaces a file
        out = Path(args.out or default_classifier_path(args.dataset))
        common.check_writable_file(out, "--out")
        if out.exists() and not args.overwrite:
            common.fail(f"--out {out} already exists; pass --overwrite to replace it, or give another path")
        return train_classifier(args)
    device = common.pick_device(args.device)
    requested = None
    # every check before the work: a missing classifier or a bad output path must not cost
    # minutes of sampling first
    common.check_finite(eta=args.eta, guidance=args.guidance)
    if not 0 <= args.eta <= 1:
        common.fail(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM's noise), got {args.eta}")
    common.check_range("num_samples", args.num_samples, 2, common.LIMITS["num_samples"])
    for path, what, suffix in ((args.json, "--json", ".json"), (args.save_npz, "--save-npz", ".npz"),
                               (args.save_grid, "--save-grid", ".png"), (args.save_unsure, "--save-unsure", ".png")):
        common.check_writable_file(path, what, (suffix,), args.overwrite)
    if args.out_dir:
        common.check_writable_dir(args.out_dir)
    if args.checkpoint:
        ckpt = common.load_checkpoint(args.checkpoint)
        dataset = args.dataset or ckpt.get("args", {}).get("dataset", "mnist")
        if dataset not in SHAPES:
            common.fail(f"the checkpoint was trained on {dataset!r}; pass --dataset to say which "
                        f"reference to compare with ({', '.join(sorted(SHAPES))})")
        cfg = ckpt["model_config"]
        made = (cfg["image_size"], cfg["image_size"], cfg["channels"])
        if made != SHAPES[dataset]:
            common.fail(f"the checkpoint makes {' x '.join(map(str, made))} images, but {dataset} "
                        f"images are {' x '.join(map(str, SHAPES[dataset]))}; pass the right --dataset")
        n = args.num_samples if args.num_samples is not None else (50000 if dataset == "cifar10" else 10000)
        if n < 2 or args.batch_size < 1:
            common.fail("--num-samples must be at least 2 and --batch-size at least 1")
        student_steps = common.distilled_steps(ckpt)
        if args.steps is None:
            args.steps = student_steps or 50
        if not 1 <= args.steps <= ckpt["diffusion"]["timesteps"]:
            common.fail(f"--steps must be in [1, {ckpt['diffusion']['timesteps']}]")
        common.check_student(student_steps, args.sampler, args.steps, args.eta, args.spacing)
        check_feature_network(dataset, args, device)
        start = time.perf_counter()
        images, requested = sample_from_checkpoint(ckpt, n, args.sampler, args.steps,
                                                   args.batch_size, device, args.seed,
                                                   args.guidance, args.eta, spacing=args.spacing)
        steps = ckpt["diffusion"]["timesteps"] if args.sampler == "ddpm" else args.steps
        label = common.sampler_label(args.sampler, steps, args.eta, args.spacing)
        if student_steps:
            label = f"distilled student, {steps} steps"
        sampling = {"sampler": label,
                    "sampling_seconds": time.perf_counter() - start}
        if args.save_npz:
            save_npz(images, args.save_npz)
        source = args.checkpoint
    elif args.baseline:
        dataset = args.dataset or "mnist"
        n = 1000 if args.num_samples is None else args.num_samples
        if n < 2:
            common.fail("--num-samples must be at least 2")
        check_feature_network(dataset, args, device)
        images = baseline_images(args.baseline, dataset, args.data_dir, n, args.seed)
        source, sampling = f"baseline {args.baseline}: {BASELINES[args.baseline]}", {}
        if args.save_npz:
            save_npz(images, args.save_npz)
    else:
        dataset = args.dataset or "mnist"
        source, sampling = args.samples, {}
        if Path(source).is_dir():
            images = load_png_folder(source, SHAPES[dataset][2])
        else:
            images = load_npz(source)
        check_feature_network(dataset, args, device)
    images = check_samples(images, dataset, source)
    if args.save_grid:
        common.save_grid(uint8_nhwc_to_model(images[:64]), args.save_grid, nrow=8)
    report = evaluate_images(images, dataset, args, device, requested)
    report.update(sampling, source=str(source))
    print_report(report)
    for path in ([args.json] if args.json else []) + \
            ([Path(args.out_dir) / "report.json"] if args.out_dir else []):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    common.run(main, parse_args)
