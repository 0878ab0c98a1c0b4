"""train_diffusion.py end to end on tiny data sets in the real formats, and its failures."""

import csv
import math
import os
import signal

import pytest
import torch
from PIL import Image

import common
import optimizers
import training
import diffusion
import diffusion_cifar
import export
import train_diffusion
from helpers import tiny_mnist_args, write_idx, write_image_folder, write_mnist

TINY = tiny_mnist_args(timesteps=50, sample_steps=5)


def run(tmp_path, *extra, out="out"):
    args = train_diffusion.parse_args([*TINY, "--data-dir", str(tmp_path / "data"),
                                       "--out-dir", str(tmp_path / out), *extra])
    return train_diffusion.main(args).state


@pytest.fixture
def mnist_dir(tmp_path):
    write_mnist(tmp_path / "data")
    return tmp_path


def test_end_to_end_writes_every_output(mnist_dir):
    state = run(mnist_dir, "--epochs", "2")
    out = mnist_dir / "out"
    assert state["epoch"] == 2 and state["step"] == 2 * (80 // 16)
    for name in ("last.pt", "best.pt", "metrics.csv", "loss_curve.png", "samples_epoch001.png",
                 "samples_epoch002.png", "samples.png", "progress.png"):
        assert (out / name).is_file(), name
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == common.METRIC_FIELDS
    assert [float(r["epoch"]) for r in rows] == [1.0, 2.0]
    assert all(float(r["val_loss"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    # 64 samples in an 8 x 8 grid of 28-pixel images with 2-pixel padding
    assert Image.open(out / "samples.png").size == (8 * 30 + 2, 8 * 30 + 2)

    # the checkpoint holds everything, and the model can be rebuilt from it alone
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for key in ("kind", "model_config", "model", "ema", "optimizer", "state", "rng", "args", "diffusion"):
        assert key in ckpt
    assert ckpt["kind"] == "mnist" and ckpt["state"]["step"] == 10
    model = diffusion.DiffusionModel(**ckpt["model_config"])
    model.load_state_dict(ckpt["ema"]["shadow"])
    model2, diff2, module = common.model_from_checkpoint(ckpt, "cpu")
    assert module is diffusion and diff2.num_timesteps == 50 and diff2.schedule == "cosine"
    assert diff2.prediction == "v"  # the MNIST default
    assert ckpt["ema"]["power"] == 8.0 and ckpt["args"]["ema_power"] == 8.0  # the default


def test_ddpm_recipe_is_the_papers_algorithm_and_flags_override_it(mnist_dir):
    """--recipe ddpm: eps, uniform t, AdamW at a constant rate, the plain process and targets;
    the checkpoint says so. Any flag overrides its recipe; --ema-power reaches the EMA."""
    run(mnist_dir, "--max-steps", "2", "--recipe", "ddpm", "--ema-power", "3")
    ckpt = torch.load(mnist_dir / "out" / "last.pt", weights_only=True)
    a = ckpt["args"]
    assert (a["recipe"], a["prediction"], a["t_power"], a["optimizer"], a["lr_schedule"]) == \
        ("ddpm", "eps", 1.0, "adamw", "constant")
    assert a["reference_size"] == 0 and ckpt["model_config"]["self_cond"] is False
    assert ckpt["diffusion"] == {"timesteps": 50, "schedule": "cosine", "prediction": "eps"}
    assert "exp_avg" in next(iter(ckpt["optimizer"]["state"].values()))  # AdamW's state
    assert ckpt["ema"]["power"] == 3.0
    _, diff, _ = common.model_from_checkpoint(ckpt, "cpu")
    assert type(diff) is diffusion.GaussianDiffusion  # no self-conditioning
    fast = train_diffusion.parse_args([])
    assert (fast.recipe, fast.prediction, fast.optimizer, fast.self_cond, fast.reference_size) == \
        ("fast", "v", "muon", True, 2048)
    mixed = train_diffusion.parse_args(["--recipe", "ddpm", "--prediction", "v", "--self-cond"])
    assert (mixed.prediction, mixed.self_cond, mixed.optimizer) == ("v", True, "adamw")


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_continues_exactly(mnist_dir, optimizer):
    run(mnist_dir, "--epochs", "2", "--optimizer", optimizer, out="straight")
    run(mnist_dir, "--epochs", "2", "--max-steps", "5", "--optimizer", optimizer, out="split")  # one epoch
    split = mnist_dir / "split"
    args = train_diffusion.parse_args(["--resume", str(split / "last.pt"), "--max-steps", "10",
                                       "--out-dir", str(split), "--device", "cpu",
                                       "--data-dir", str(mnist_dir / "data")])
    train_diffusion.main(args)
    a = torch.load(mnist_dir / "straight" / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert a["state"] == b["state"] and b["args"]["optimizer"] == optimizer
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    with open(split / "metrics.csv") as f:
        assert [float(r["epoch"]) for r in csv.DictReader(f)] == [1.0, 2.0]


def test_budgets_stop_early_and_resume_mid_epoch(mnist_dir):
    state = run(mnist_dir, "--max-steps", "3")
    assert state["step"] == 3 and state["epoch"] == 0 and state["batch_in_epoch"] == 3
    out = mnist_dir / "out"
    assert (out / "samples.png").is_file() and (out / "samples_epoch001.png").is_file()
    args = train_diffusion.parse_args(["--resume", str(out / "last.pt"), "--max-steps", "100",
                                       "--epochs", "1", "--out-dir", str(out), "--device", "cpu",
                                       "--data-dir", str(mnist_dir / "data")])
    state = train_diffusion.main(args).state
    assert state["epoch"] == 1 and state["step"] == 5  # the epoch was finished, not restarted
    state = run(mnist_dir, "--max-minutes", "0.0001", out="timed")
    assert state["step"] == 1


def test_early_stopping_and_best_checkpoint(mnist_dir):
    # a min-delta that only the first epoch (after an infinite best) can beat: it stops after
    # --patience more epochs without an improvement, and best.pt stays the first epoch's
    state = run(mnist_dir, "--epochs", "10", "--patience", "2", "--min-delta", "100")
    assert state["epoch"] == 3 and state["bad_epochs"] == 2
    assert torch.load(mnist_dir / "out" / "best.pt", weights_only=True)["state"]["step"] == 5
    state = run(mnist_dir, "--epochs", "2", "--min-delta", "0", out="b")
    best = torch.load(mnist_dir / "b" / "best.pt", weights_only=True)
    assert best["state"]["best_val"] == state["best_val"]


def test_end_of_epoch_work_is_skipped_where_it_would_cost_more_than_its_share(mnist_dir):
    # epochs of 5 tiny steps take far less than 32x the validation + grid + checkpoint work,
    # so with the default 3% only the first and the last epoch are validated
    state = run(mnist_dir, "--epochs", "8", "--eval-share", "0.03", "--patience", "1", "--min-delta", "100")
    with open(mnist_dir / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["epoch"]) for r in rows] == [1.0, 8.0] and state["epoch"] == 8
    assert sorted(p.name for p in (mnist_dir / "out").glob("samples_epoch*.png")) == \
        ["samples_epoch001.png", "samples_epoch008.png"]
    assert torch.load(mnist_dir / "out" / "last.pt", weights_only=True)["state"]["step"] == 40
    with pytest.raises(SystemExit, match="--eval-share must be in"):
        run(mnist_dir, "--eval-share", "0", out="zero")


def test_class_conditional_grid_has_a_row_per_class(mnist_dir):
    run(mnist_dir, "--epochs", "1", "--class-cond", "--guidance", "3")
    ckpt = torch.load(mnist_dir / "out" / "last.pt", weights_only=True)
    assert ckpt["model_config"]["num_classes"] == 10
    assert Image.open(mnist_dir / "out" / "samples.png").size == (8 * 30 + 2, 10 * 30 + 2)


def test_image_folder_dataset(tmp_path):
    folder = write_image_folder(tmp_path / "shapes", n_per_class=20)
    args = train_diffusion.parse_args([*TINY, "--dataset", str(folder), "--image-size", "16",
                                       "--hidden-dims", "8", "16", "--val-size", "8",
                                       "--epochs", "1", "--class-cond", "--out-dir", str(tmp_path / "o")])
    train_diffusion.main(args)
    ckpt = torch.load(tmp_path / "o" / "last.pt", weights_only=True)
    assert ckpt["model_config"]["image_size"] == 16 and ckpt["model_config"]["num_classes"] == 2
    assert Image.open(tmp_path / "o" / "samples.png").size == (8 * 18 + 2, 2 * 18 + 2)


def test_idx_files_read_from_a_flat_folder_uncompressed(tmp_path):
    # Debian-style: the four files directly in one folder, here without .gz
    write_mnist(tmp_path, folder="flat", compress=False)
    data = common.load_dataset("fashion-mnist", tmp_path / "flat", 28, 1, download=False)
    assert data.images.shape == (96, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.shape == (96,) and data.num_classes == 10
    test = common.load_dataset("fashion-mnist", tmp_path / "flat", 28, 1, split="test", download=False)
    assert len(test.images) == 40


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(mnist_dir, monkeypatch):
    run(mnist_dir, "--epochs", "1")
    last = mnist_dir / "out" / "last.pt"
    before = last.read_bytes()
    monkeypatch.setattr(diffusion.GaussianDiffusion, "loss",
                        lambda self, x0, *a, **k: self.model(x0, torch.zeros(len(x0), dtype=torch.long)).sum() * float("nan"))
    with pytest.raises(SystemExit, match="loss became nan at step 5"):
        train_diffusion.main(train_diffusion.parse_args(
            ["--resume", str(last), "--epochs", "2", "--out-dir", str(mnist_dir / "out"),
             "--device", "cpu", "--data-dir", str(mnist_dir / "data")]))
    assert last.read_bytes() == before


def test_a_diverged_run_never_replaces_the_good_checkpoint(mnist_dir):
    """--lr 1e30: the loss may stay finite for a step while the weights blow up; neither
    last.pt nor best.pt is then written, and the run stops with the message."""
    run(mnist_dir, "--epochs", "1")
    out = mnist_dir / "out"
    before = {f: (out / f).read_bytes() for f in ("last.pt", "best.pt")}
    with pytest.raises(SystemExit, match="diverged|loss became"):
        train_diffusion.main(train_diffusion.parse_args(
            ["--resume", str(out / "last.pt"), "--epochs", "3", "--lr", "1e30", "--warmup", "0",
             "--optimizer", "muon", "--data-dir", str(mnist_dir / "data")]))
    assert {f: (out / f).read_bytes() for f in before} == before
    common.load_checkpoint(out / "last.pt", "mnist")  # still finite, still loads


def test_ctrl_c_saves_last_and_exits(mnist_dir, monkeypatch):
    real_loss = diffusion.GaussianDiffusion.loss
    calls = []

    def loss_then_interrupt(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return real_loss(self, *a, **k)

    monkeypatch.setattr(diffusion.GaussianDiffusion, "loss", loss_then_interrupt)
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exc:
        run(mnist_dir, "--epochs", "3")
    assert exc.value.code == 130
    ckpt = torch.load(mnist_dir / "out" / "last.pt", weights_only=True)
    assert ckpt["state"]["step"] == 2 and ckpt["state"]["batch_in_epoch"] == 2
    assert signal.getsignal(signal.SIGINT) is handler_before  # restored


def test_missing_data_offline_gives_a_clear_message(tmp_path, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(SystemExit, match=r"(?s)mnist \(train split\) is not in .*MNIST/raw"):
        run(tmp_path, "--epochs", "1")


def test_init_from_starts_a_new_run_from_a_models_weights(mnist_dir):
    """--init-from (fine-tuning): a fresh run that keeps the given model's network and process,
    from a checkpoint or a weights-only file. With --class-cond an unconditional model gains a
    class embedding at zero, so the run starts from exactly that model, for every label."""
    run(mnist_dir, "--max-steps", "3", "--recipe", "ddpm", "--self-cond", "--schedule", "linear", out="base")
    base = torch.load(mnist_dir / "base" / "last.pt", weights_only=True)
    common.save_checkpoint(export.weights_only(base, torch.float32), mnist_dir / "base.pt")
    # at a learning rate of 1e-30 its one step leaves the weights as they started
    args = train_diffusion.parse_args([*TINY, "--data-dir", str(mnist_dir / "data"), "--out-dir",
                                       str(mnist_dir / "ft"), "--init-from", str(mnist_dir / "base.pt"),
                                       "--class-cond", "--max-steps", "1", "--lr", "1e-30"])
    trainer = train_diffusion.main(args)
    assert trainer.state["step"] == 1  # fresh counters
    ckpt = torch.load(mnist_dir / "ft" / "last.pt", weights_only=True)
    assert ckpt["diffusion"] == base["diffusion"]  # linear, eps: not this recipe's cosine, v
    assert ckpt["model_config"] == {**base["model_config"], "num_classes": 10}
    assert ckpt["args"]["self_cond"] is True and ckpt["args"]["recipe"] == "fast"
    old, _, _ = common.model_from_checkpoint(base, "cpu")
    x, t = torch.randn(11, 1, 28, 28), torch.randint(0, 50, (11,))
    x0_self = torch.randn_like(x)
    with torch.no_grad():
        want = old(x, t, None, x0_self)
        got = trainer.model.eval()(x, t, torch.arange(-1, 10), x0_self)  # the null class and 0..9
    assert torch.allclose(got, want, atol=1e-6)

    # the fine-tuned run resumes like any other; a contradicting flag or both starts are refused
    state = train_diffusion.main(train_diffusion.parse_args(
        ["--resume", str(mnist_dir / "ft" / "last.pt"), "--max-steps", "2",
         "--data-dir", str(mnist_dir / "data")])).state
    assert state["step"] == 2
    with pytest.raises(SystemExit, match="--prediction eps: a run started from it keeps"):
        run(mnist_dir, "--init-from", str(mnist_dir / "base.pt"), "--prediction", "v", out="x")
    # the checks that depend on the process see the model's 50 steps, not the default 1,000
    no_steps = [a for a in TINY if a not in ("--timesteps", "50")]
    with pytest.raises(SystemExit, match=r"--sample-steps \(60\) cannot exceed --timesteps \(50\)"):
        train_diffusion.main(train_diffusion.parse_args(
            [*no_steps, "--data-dir", str(mnist_dir / "data"), "--out-dir", str(mnist_dir / "x"),
             "--init-from", str(mnist_dir / "base.pt"), "--sample-steps", "60"]))
    with pytest.raises(SystemExit, match="give one of them"):
        run(mnist_dir, "--init-from", str(mnist_dir / "base.pt"), "--resume",
            str(mnist_dir / "ft" / "last.pt"), out="ft")
    common.save_checkpoint({"kind": "cifar", "model_config": {}, "diffusion": {}, "model": {},
                            "ema": {}}, mnist_dir / "cifar.pt")
    with pytest.raises(SystemExit, match="train_diffusion_cifar.py"):
        run(mnist_dir, "--init-from", str(mnist_dir / "cifar.pt"), out="x")
    write_image_folder(mnist_dir / "shapes")  # two classes, not the model's ten
    with pytest.raises(SystemExit, match="a model of 10 classes; the data set has 2"):
        run(mnist_dir, "--init-from", str(mnist_dir / "ft" / "last.pt"), "--dataset",
            str(mnist_dir / "shapes"), out="x")


def test_bad_checkpoints_are_refused(mnist_dir):
    out = mnist_dir / "out"
    out.mkdir()
    (out / "garbage.pt").write_bytes(os.urandom(2000))
    with pytest.raises(SystemExit, match="corrupted or not a checkpoint"):
        run(mnist_dir, "--resume", str(out / "garbage.pt"))
    common.save_checkpoint({"kind": "cifar", "model_config": {}, "diffusion": {}, "model": {},
                            "ema": {}}, out / "cifar.pt")
    with pytest.raises(SystemExit, match="train_diffusion_cifar.py"):
        run(mnist_dir, "--resume", str(out / "cifar.pt"))
    torch.save({"weights": torch.zeros(3)}, out / "other.pt")
    with pytest.raises(SystemExit, match="not a checkpoint of this project"):
        run(mnist_dir, "--resume", str(out / "other.pt"))
    with pytest.raises(SystemExit, match="does not exist"):
        run(mnist_dir, "--resume", str(out / "nope.pt"))


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--sample-steps", "60"], "cannot exceed --timesteps"),
    (["--val-size", "96"], "--val-size must be between"),
    (["--batch-size", "100"], "cannot fill one batch"),
    (["--lr", "-1"], "--lr must be a positive"),
    (["--image-size", "30"], "must be divisible"),
    (["--dataset", "imagenet"], "neither a known data set"),
    (["--p-uncond", "1.5"], "--p-uncond must be in"),
    (["--t-power", "0"], "--t-power must be in"),
    (["--ema-power", "-1"], "--ema-power must be >= 0"),
    (["--ema-power", "nan"], "--ema-power must be a finite number"),
    (["--reference-size", "-1"], "--reference-size must be 0"),
])
def test_impossible_arguments(mnist_dir, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(mnist_dir, *extra)


@pytest.mark.parametrize("class_cond", [False, True])
def test_stable_targets_draw_references_from_the_training_split(mnist_dir, monkeypatch, class_cond):
    """--reference-size N: every training step builds its targets from the batch and N random
    training images (with their labels for a conditional model), never a validation image;
    0: the plain targets."""
    seen = []
    real = training.Trainer.stable_targets

    def spy(self, x0, labels, y, t, noise, reference):
        seen.append(reference)
        return real(self, x0, labels, y, t, noise, reference)
    monkeypatch.setattr(training.Trainer, "stable_targets", spy)
    extra = ["--class-cond"] if class_cond else []
    run(mnist_dir, "--max-steps", "3", "--reference-size", "40", *extra)
    assert len(seen) == 3
    train = train_diffusion.common.load_dataset("mnist", str(mnist_dir / "data"), 28, 1)
    train_idx, val_idx = common.split_train_val(len(train.images), 16)
    images = common.to_model_range(train.images).flatten(1)
    for reference, reference_y in seen:
        assert reference.shape == (40, 1, 28, 28)
        # each reference is a training image (its label with it), none a validation image
        match = (reference.flatten(1)[:, None] == images[None]).all(-1)  # (40, all images)
        assert match.any(1).all() and not match[:, val_idx].any()
        if class_cond:
            first = match.float().argmax(1)
            assert torch.equal(reference_y, train.labels[first])
        else:
            assert reference_y is None
    seen.clear()
    run(mnist_dir, "--max-steps", "2", "--reference-size", "0", *extra, out="off")
    assert seen == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_missing_gpu_is_a_clear_error(mnist_dir):
    with pytest.raises(SystemExit, match="no CUDA GPU is available"):
        run(mnist_dir, "--device", "cuda")


def test_corrupted_idx_file(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    write_mnist(tmp_path / "data")
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(SystemExit, match="could not read IDX file"):
        run(tmp_path)
    write_idx(raw / "train-images-idx3-ubyte.gz", torch.zeros(5, 28, 28, dtype=torch.uint8).numpy())
    with pytest.raises(SystemExit, match="inconsistent shapes"):
        run(tmp_path)


def test_cosine_and_constant_learning_rate_schedules(mnist_dir):
    # warmup of 1 step, then lr * (1 + cos(pi * step / total)) / 2 over one epoch of 5 steps
    run(mnist_dir, "--epochs", "1", "--warmup", "1", "--lr", "2e-3", "--lr-schedule", "cosine")
    with open(mnist_dir / "out" / "metrics.csv") as f:
        last_lr = float(list(csv.DictReader(f))[-1]["lr"])
    assert last_lr == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    run(mnist_dir, "--epochs", "1", "--warmup", "1", "--lr", "2e-3", "--lr-schedule", "constant", out="c")
    with open(mnist_dir / "c" / "metrics.csv") as f:
        assert float(list(csv.DictReader(f))[-1]["lr"]) == pytest.approx(2e-3)


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
def test_training_timesteps_have_density_proportional_to_t_to_the_power_minus_one(power):
    torch.manual_seed(0)
    T, n = 1000, 400_000
    t = training.training_timesteps(n, T, power, torch.device("cpu"))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= T - 1
    # P(t < T/2) = (1/2)^power: 1/2 uniform, 1/4 for power 2
    assert (t < T // 2).float().mean().item() == pytest.approx(0.5 ** power, abs=0.005)
    # P(a <= t/T < b) = b^power - a^power
    counts = torch.bincount(t, minlength=T).float()
    ratio = counts[700:800].sum() / counts[200:300].sum()
    assert ratio.item() == pytest.approx((0.8 ** power - 0.7 ** power) / (0.3 ** power - 0.2 ** power), rel=0.05)
    assert counts[T - 1] > 0 and (power > 1 or counts[0] > 0)


def test_memory_format_is_nchw_only_for_cpu_bf16():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert common.memory_format(cpu, bf16=True) == torch.contiguous_format
    assert common.memory_format(cpu, bf16=False) == torch.channels_last
    assert common.memory_format(cuda, bf16=True) == torch.channels_last


def test_progress_rows_and_the_training_loss_log_survive_a_resume(mnist_dir):
    """progress.png gains a row at steps 25, 50, 100, ... (doubling); the smoothed training
    loss is kept every 25 steps; both carry over a resume."""
    run(mnist_dir, "--max-steps", "60", "--epochs", "20")
    last = mnist_dir / "out" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    log = ckpt["train_log"]
    assert sorted(ckpt["progress"]) == [25, 50]
    assert sorted(log) == [25, 50] and all(0 < v < 10 for v in log.values())
    train_diffusion.main(train_diffusion.parse_args(["--resume", str(last), "--max-steps", "100",
                                                     "--device", "cpu", "--data-dir", str(mnist_dir / "data")]))
    ckpt = torch.load(last, weights_only=True)
    progress, log2 = ckpt["progress"], ckpt["train_log"]
    assert sorted(progress) == [25, 50, 100]
    assert progress[100].shape == (8, 1, 28, 28) and progress[100].dtype == torch.uint8
    assert sorted(log2) == [25, 50, 75, 100] and log2[50] == log[50]
    # one labelled row per snapshot
    assert Image.open(mnist_dir / "out" / "progress.png").size[1] > 3 * 28


def test_python_diffusion_prints_the_unet(capsys):
    model = diffusion.DiffusionModel(self_cond=True)
    diffusion.describe(model)
    out = capsys.readouterr().out
    assert "downs[0]" in out and "(16, 14, 14)" in out and "bottleneck" in out and "(64, 7, 7)" in out
    assert f"{sum(p.numel() for p in model.parameters()):,}" in out.splitlines()[-1]  # the total


# -- the optimizer: Muon for the weight matrices, AdamW for the rest ---------------------------

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def test_newton_schulz_keeps_the_singular_vectors_and_brings_the_values_near_one():
    """newton_schulz(G) = U p(S / ||G||_F) V^T with p the quintic applied five times: checked
    against the SVD in float64, for singular values spread over two decades."""
    torch.manual_seed(0)
    spread = torch.diag(torch.logspace(-2, 0, 40, dtype=torch.float64))
    G = torch.randn(3, 16, 40, dtype=torch.float64) @ spread  # (B, m, n), m <= n
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = S / torch.linalg.matrix_norm(G)[:, None]
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        s = a * s + b * s ** 3 + c * s ** 5
    O = optimizers.newton_schulz(G)
    assert torch.allclose(O, U @ torch.diag_embed(s) @ Vh, atol=1e-6)
    values = torch.linalg.svdvals(O)
    assert (S >= 0.01 * torch.linalg.matrix_norm(G)[:, None]).all()
    assert values.min() > 0.68 and values.max() < 1.14  # the docstring's range
    # a tall batch is orthogonalized as its transpose
    assert torch.allclose(optimizers.newton_schulz(G.mT), O.mT, atol=1e-12)


def test_muon_step_is_the_orthogonalized_nesterov_momentum_with_rms_0_2():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 4, 3)  # weight (4, 8, 3, 3): a wide 4 x 72 matrix
    linear = torch.nn.Linear(4, 12)  # weight (12, 4): tall, orthogonalized as its transpose
    params = [conv.weight, linear.weight]
    lr, mu = 0.01, 0.9
    opt = optimizers.Muon([dict(params=params, matrix=True)], lr=lr, momentum=mu)
    g1, g2 = [torch.randn_like(p) for p in params], [torch.randn_like(p) for p in params]
    w0 = [p.detach().clone() for p in params]
    for p, g in zip(params, g1):
        p.grad = g.clone()
    opt.step()
    for p, w, g in zip(params, w0, g1):
        # first step: M = G, so the update orthogonalizes G + mu G, which has G's singular vectors
        G = g.reshape(len(g), -1).double()
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        n = max(G.shape)
        step = (w - p.detach()).reshape(G.shape).double() / (lr * 0.2 * n ** 0.5)
        D = U.T @ step @ Vh.T  # diagonal: the step's singular vectors are G's
        assert torch.allclose(D, torch.diag(torch.diagonal(D)), atol=1e-4)
        assert 0.68 < torch.diagonal(D).min() and torch.diagonal(D).max() < 1.14
        rms = (w - p.detach()).pow(2).mean().sqrt().item() / lr  # per unit lr: AdamW's about 0.2
        assert 0.2 * 0.68 < rms < 0.2 * 1.14
    w1 = [p.detach().clone() for p in params]
    for p, g in zip(params, g2):
        p.grad = g.clone()
    opt.step()
    for p, w, a, b in zip(params, w1, g1, g2):
        momentum = mu * a + b  # M <- mu M + G
        U = (b + mu * momentum).reshape(len(b), -1)  # Nesterov
        tall = U.shape[0] > U.shape[1]
        O = optimizers.newton_schulz((U.T if tall else U)[None])[0]
        expected = w - lr * 0.2 * max(U.shape) ** 0.5 * (O.T if tall else O).reshape(w.shape)
        assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_muon_updates_the_other_parameters_exactly_as_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.randn(5, requires_grad=True), torch.randn(3, 4, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt = optimizers.Muon([dict(params=ours)], lr=0.01, weight_decay=0.1)  # matrix=False: AdamW
    ref = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.1)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("kind", ["mnist", "cifar"])
def test_muon_takes_the_hidden_weight_matrices_and_adamw_the_rest(kind):
    model = (diffusion.DiffusionModel(self_cond=True, num_classes=10) if kind == "mnist" else
             diffusion_cifar.DiffusionModel(base_channels=32, num_classes=10))
    matrices, rest = optimizers.muon_param_groups(model)
    name = {id(p): n for n, p in model.named_parameters()}
    muon = {name[id(p)] for p in matrices["params"]}
    adamw = {name[id(p)] for p in rest["params"]}
    assert matrices["matrix"] and not rest["matrix"]
    assert not muon & adamw and len(muon | adamw) == len(name)
    assert "init_conv.weight" in adamw and "out.2.weight" in adamw  # reads pixels, writes output
    assert "class_embed.weight" in adamw and all(n.endswith("weight") for n in muon)
    assert {"time_embed.mlp.0.weight", "bottleneck.attn.qkv.weight"} <= muon or kind == "cifar"
    assert all(model.get_parameter(n).ndim >= 2 for n in muon)
    assert all(model.get_parameter(n).ndim == 1 for n in adamw - {"init_conv.weight", "out.2.weight",
                                                                      "class_embed.weight"})
