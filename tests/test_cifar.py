"""diffusion_cifar.py's U-Net, its parity with diffusion.py, and train_diffusion_cifar.py end to end.

The process math of both modules is tested in test_diffusion.py (fixture D).
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import common
import diffusion
import diffusion_cifar
import train_diffusion_cifar
from helpers import CIFAR10_CLASSES, write_cifar10, write_cifar10_jpeg

TINY_CIFAR = dict(image_size=32, channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(16,), dropout=0.1)


# -- parity: the two self-contained modules share their math exactly --------------------------


def stub(x, t, y=None):
    """A fixed nonlinear 'network' that depends on x and t."""
    return torch.tanh(x * 1.3) * (0.2 + t.float().view(-1, 1, 1, 1) / 100)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_parity_of_the_two_modules(schedule, prediction):
    a = diffusion.GaussianDiffusion(stub, timesteps=100, schedule=schedule, prediction=prediction)
    b = diffusion_cifar.GaussianDiffusion(stub, timesteps=100, schedule=schedule, prediction=prediction)
    for name, buf in a.named_buffers():
        assert torch.equal(buf, getattr(b, name)), name
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 40, 99])
    assert torch.equal(a.q_sample(x0, t, noise), b.q_sample(x0, t, noise))
    torch.manual_seed(5)
    la = a.loss(x0)
    torch.manual_seed(5)
    assert torch.equal(la, b.loss(x0))

    def run(d, fn, **kw):
        return fn(d, (2, 3, 8, 8), generator=torch.Generator().manual_seed(9), **kw)

    # one DDPM step (T = 1) and whole chains, one DDIM step and a stochastic DDIM chain
    for T in (1, 100):
        a1 = diffusion.GaussianDiffusion(stub, T, schedule, prediction)
        b1 = diffusion_cifar.GaussianDiffusion(stub, T, schedule, prediction)
        assert torch.equal(run(a1, type(a1).ddpm_sample), run(b1, type(b1).ddpm_sample))
    for steps in (1, 7):
        assert torch.equal(run(a, type(a).ddim_sample, steps=steps, eta=0.5),
                           run(b, type(b).ddim_sample, steps=steps, eta=0.5))
    assert torch.equal(a.ddim_invert(x0, steps=10), b.ddim_invert(x0, steps=10))
    for steps in (1, 2, 8):
        assert torch.equal(run(a, type(a).dpm_solver_sample, steps=steps),
                           run(b, type(b).dpm_solver_sample, steps=steps))


def test_modules_have_the_same_public_names_in_the_same_order():
    def public(m):
        return [n for n in vars(m) if not n.startswith("_") and callable(getattr(m, n))
                and getattr(getattr(m, n), "__module__", None) == m.__name__]
    # the MNIST module adds section 7, the fast recipe's improvements, after the shared names
    mnist_only = ["SelfConditionedDiffusion", "posterior_weights", "stable_targets"]
    assert public(diffusion) == public(diffusion_cifar) + mnist_only
    assert diffusion.NULL_CLASS == diffusion_cifar.NULL_CLASS
    assert diffusion.PREDICTIONS == diffusion_cifar.PREDICTIONS


# -- the CIFAR U-Net --------------------------------------------------------------------------


def test_ddpm_preset_has_the_papers_parameter_count():
    m = diffusion_cifar.DiffusionModel(**diffusion_cifar.PRESETS["ddpm"])
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.02, n
    # attention at 16x16 only: two blocks down, three up, plus the bottleneck
    attn = [mod for mod in m.modules() if isinstance(mod, diffusion_cifar.SelfAttention)]
    assert len(attn) == 2 + 3 + 1
    drop = [mod for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    assert drop and all(d.p == 0.1 for d in drop)


def test_cifar_unet_shapes_dropout_and_conditioning():
    torch.manual_seed(0)
    m = diffusion_cifar.DiffusionModel(**TINY_CIFAR, num_classes=10)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    m.eval()
    out = m(x, t, torch.tensor([1, 2]))
    assert out.shape == x.shape
    assert torch.equal(out, m(x, t, torch.tensor([1, 2])))  # eval: no dropout
    assert not torch.allclose(out, m(x, t, torch.tensor([5, 5])))
    assert not torch.allclose(out, m(x, torch.tensor([500, 500]), torch.tensor([1, 2])))
    m.train()
    assert not torch.equal(m(x, t), m(x, t))  # train: dropout is active
    with pytest.raises(ValueError, match="divisible"):
        diffusion_cifar.DiffusionModel(image_size=30, channel_mult=(1, 2, 2))
    for cfg in diffusion_cifar.PRESETS.values():
        assert diffusion_cifar.DiffusionModel(**cfg).config["image_size"] == 32


# -- train_diffusion_cifar.py ------------------------------------------------------------------


def cifar_args(root, *extra, out="out"):
    return train_diffusion_cifar.parse_args(
        ["--preset", "tiny", "--data-dir", str(root / "data"), "--out-dir", str(root / out),
         "--batch-size", "16", "--val-size", "20", "--timesteps", "40", "--sample-steps", "4",
         "--warmup", "2", "--device", "cpu", "--eval-share", "1", *extra])


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "data")
    # a smaller network than the tiny preset keeps the test fast
    monkeypatch.setitem(diffusion_cifar.PRESETS, "tiny", TINY_CIFAR)
    return tmp_path


def test_cifar_training_end_to_end_and_resume(cifar_dir):
    result = train_diffusion_cifar.main(cifar_args(cifar_dir, "--epochs", "1", "--optimizer", "muon"))
    out = cifar_dir / "out"
    assert result.state["step"] == 5  # 100 images - 20 held out = 80 = 5 batches of 16
    for name in ("last.pt", "best.pt", "metrics.csv", "loss_curve.png", "samples_epoch001.png", "samples.png"):
        assert (out / name).is_file(), name
    ckpt = common.load_checkpoint(out / "last.pt", "cifar")
    assert ckpt["model_config"]["base_channels"] == 16
    assert (ckpt["diffusion"]["schedule"], ckpt["diffusion"]["prediction"]) == ("cosine", "v")  # cpu recipe
    model, _, module = common.model_from_checkpoint(ckpt, "cpu")
    assert module is diffusion_cifar
    # resume one more epoch; an MNIST script refuses this checkpoint
    args = train_diffusion_cifar.parse_args(["--resume", str(out / "last.pt"), "--epochs", "2",
                                             "--out-dir", str(out), "--device", "cpu",
                                             "--data-dir", str(cifar_dir / "data")])
    assert train_diffusion_cifar.main(args).state["step"] == 10
    assert torch.load(out / "last.pt", weights_only=True)["args"]["optimizer"] == "muon"
    import train_diffusion
    with pytest.raises(SystemExit, match="use train_diffusion_cifar.py"):
        train_diffusion.main(train_diffusion.parse_args(["--resume", str(out / "last.pt")]))
    # fine-tuning it (--init-from) into a class-conditional model without dropout: the network
    # is the checkpoint's, its new class embedding starts at zero
    tuned = train_diffusion_cifar.main(cifar_args(cifar_dir, "--init-from", str(out / "last.pt"),
                                                  "--class-cond", "--dropout", "0", "--max-steps", "1",
                                                  out="tuned"))
    cfg = torch.load(cifar_dir / "tuned" / "last.pt", weights_only=True)["model_config"]
    assert cfg == {**ckpt["model_config"], "num_classes": 10, "dropout": 0.0}
    assert tuned.state["step"] == 1 and tuned.model.class_embed.weight.abs().max() < 1e-2


def test_recipes_set_the_defaults_and_flags_override_them():
    cpu = train_diffusion_cifar.parse_args([])
    assert (cpu.recipe, cpu.preset, cpu.lr, cpu.warmup, cpu.schedule, cpu.prediction, cpu.lr_schedule) == \
        ("cpu", "cpu", 1e-3, 200, "cosine", "v", "cosine")
    assert cpu.optimizer == "adamw"  # Muon was measured on MNIST only
    paper = train_diffusion_cifar.parse_args(["--recipe", "paper"])
    assert (paper.preset, paper.lr, paper.warmup, paper.ema_decay, paper.batch_size, paper.schedule,
            paper.prediction, paper.t_power) == ("ddpm", 2e-4, 5000, 0.9999, 128, "linear", "eps", 1.0)
    mixed = train_diffusion_cifar.parse_args(["--lr", "3e-4", "--recipe", "paper", "--preset", "small"])
    assert (mixed.lr, mixed.preset, mixed.warmup) == (3e-4, "small", 5000)
    # the paper's network is untouched by the CPU recipe
    assert diffusion_cifar.PRESETS["ddpm"] == dict(image_size=32, channels=3, base_channels=128,
                                                   channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                                                   attn_resolutions=(16,), dropout=0.1)


def test_cifar10_from_jpeg_class_folders(tmp_path, monkeypatch):
    """The layout of ../shared/data/cifar10: <data-dir>/{train,test}/<class>/*.jpg."""
    write_cifar10_jpeg(tmp_path / "data", n_train=3, n_test=2)
    train = common.load_dataset("cifar10", tmp_path / "data", 32, 3, "train")
    test = common.load_dataset("cifar10", tmp_path / "data", 32, 3, "test")
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test.images) == 20 and train.num_classes == 10 and train.name == "cifar10"
    # labels follow CIFAR-10's class order, which is the folders' sorted order
    assert CIFAR10_CLASSES == tuple(sorted(CIFAR10_CLASSES))
    assert train.labels.tolist() == [k for k in range(10) for _ in range(3)]
    # the colour square of class 3 survives JPEG: blue (0, 130, 200) dominates its images
    x = train.images[train.labels == 3].float()
    assert x[:, 2].mean() > x[:, 0].mean() + 30
    # class-conditional training straight from the folders, via --data-dir or --dataset
    monkeypatch.setitem(diffusion_cifar.PRESETS, "tiny", TINY_CIFAR)
    for source in (["--data-dir", str(tmp_path / "data")], ["--dataset", str(tmp_path / "data" / "train")]):
        out = f"out{len(source[1])}"
        result = train_diffusion_cifar.main(cifar_args(tmp_path, "--epochs", "1", "--class-cond",
                                                       "--val-size", "10", *source, out=out))
        assert result.state["step"] == 1  # 30 images - 10 held out = 20: one full batch of 16
        assert common.load_checkpoint(tmp_path / out / "last.pt")["model_config"]["num_classes"] == 10
    # a folder that is not CIFAR-10's ten classes is refused with the reason
    write_cifar10_jpeg(tmp_path / "three", n_train=1, n_test=1, classes=("a", "b", "c"))
    with pytest.raises(SystemExit, match="ten class folders, found 3"):
        common.load_dataset("cifar10", tmp_path / "three", 32, 3, "train")


def test_random_flips_flip_about_half():
    torch.manual_seed(0)
    x = torch.arange(4.0).view(1, 1, 1, 4).repeat(1000, 3, 2, 1)
    y = train_diffusion_cifar.random_hflip(x)
    flipped = (y[:, 0, 0, 0] == 3).float().mean().item()
    assert 0.45 < flipped < 0.55
    assert torch.equal(y[y[:, 0, 0, 0] == 3], x.flip(3)[y[:, 0, 0, 0] == 3])


def test_cifar_missing_offline_and_bad_args(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit, match="CIFAR-10 \\(train split\\) is not in"):
        train_diffusion_cifar.main(cifar_args(tmp_path))
    with pytest.raises(SystemExit, match="--dropout must be in"):
        train_diffusion_cifar.main(cifar_args(tmp_path, "--dropout", "2"))
    bad = tmp_path / "data" / "cifar-10-batches-py"
    write_cifar10(tmp_path / "data")
    (bad / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(SystemExit, match="could not read CIFAR-10 batch"):
        train_diffusion_cifar.main(cifar_args(tmp_path))


# -- DistributedDataParallel on 2 CPU processes with gloo -------------------------------------


def _ddp_worker(rank, world, port, root, epochs, resume):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    diffusion_cifar.PRESETS["tiny"] = TINY_CIFAR
    from pathlib import Path
    root = Path(root)
    extra = ["--epochs", str(epochs), "--batch-size", "8"]
    if resume:
        extra += ["--resume", str(root / "out" / "last.pt")]
    result = train_diffusion_cifar.main(cifar_args(root, *extra))
    torch.save({"model": result.model.state_dict(), "ema": result.ema.shadow, "state": result.state},
               root / f"rank{rank}.pt")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_end_identical_and_resume(cifar_dir):
    for epochs, resume in ((1, False), (2, True)):
        mp.spawn(_ddp_worker, args=(2, free_port(), str(cifar_dir), epochs, resume), nprocs=2, join=True)
        r0 = torch.load(cifar_dir / "rank0.pt", weights_only=True)
        r1 = torch.load(cifar_dir / "rank1.pt", weights_only=True)
        # 80 training images over 2 ranks at batch 8: 5 steps per epoch
        assert r0["state"]["step"] == r1["state"]["step"] == 5 * epochs
        for k in r0["model"]:
            assert torch.equal(r0["model"][k], r1["model"][k]), k
            assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    ckpt = torch.load(cifar_dir / "out" / "last.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["state"]["step"] == 10  # only rank 0 wrote, for both
    assert not (cifar_dir / "out" / "last.pt.tmp").exists()
