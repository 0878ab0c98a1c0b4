"""Bad input and interruptions: resume always works, a run is never overwritten silently, and
every mistake ends in one clear `error:` line, before the work starts."""

import csv
import os
import pickle
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import common
import ddim_compare
import diffusion
import evaluate
import interpolate
import train_diffusion
from helpers import tiny_mnist_args, write_cifar10, write_idx, write_mnist

TINY = tiny_mnist_args(timesteps=20, sample_steps=4)


def train(root, *extra, out="out"):
    args = train_diffusion.parse_args([*TINY, "--data-dir", str(root / "data"),
                                       "--out-dir", str(root / out), *extra])
    return train_diffusion.main(args)


def resume(root, ckpt, *extra):
    return train_diffusion.main(train_diffusion.parse_args(
        ["--resume", str(ckpt), "--device", "cpu", "--data-dir", str(root / "data"), *extra]))


@pytest.fixture
def mnist(tmp_path):
    write_mnist(tmp_path / "data")
    return tmp_path


@pytest.fixture
def trained(tiny_runs):
    return tiny_runs


def interrupt_at_call(monkeypatch, n, sig=signal.SIGINT):
    """Send `sig` to this process during the n-th training loss, as Ctrl-C or kill would."""
    real_loss = diffusion.GaussianDiffusion.loss
    calls = []

    def loss(self, *a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), sig)
        return real_loss(self, *a, **k)

    monkeypatch.setattr(diffusion.GaussianDiffusion, "loss", loss)


# -- 1, 2, 8: interruptions and resuming -------------------------------------------------------


def test_ctrl_c_at_the_last_step_of_an_epoch_resumes(mnist, monkeypatch):
    interrupt_at_call(monkeypatch, 1)
    with pytest.raises(SystemExit) as exc:
        train(mnist, "--batch-size", "80", "--epochs", "3")  # 80 training images: one batch an epoch
    assert exc.value.code == 130
    last = mnist / "out" / "last.pt"
    assert torch.load(last, weights_only=True)["state"]["batch_in_epoch"] == 1
    monkeypatch.undo()
    state = resume(mnist, last, "--epochs", "3").state
    assert state["epoch"] == 3 and state["step"] == 3


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigterm_saves_like_ctrl_c(mnist, monkeypatch, sig):
    interrupt_at_call(monkeypatch, 3, sig)
    before = signal.getsignal(sig)
    with pytest.raises(SystemExit) as exc:
        train(mnist, "--epochs", "2")
    assert exc.value.code == 130
    assert torch.load(mnist / "out" / "last.pt", weights_only=True)["state"]["step"] == 3
    assert signal.getsignal(sig) is before


def test_resumed_time_budget_continues_the_schedule(mnist):
    """Elapsed time is saved: resumed after 599.4 s of a 20-minute budget, the cosine decay goes
    on from its middle (lr / 2), and the clock from 599.4 s; a used-up budget trains nothing."""
    train(mnist, "--max-steps", "2", "--max-minutes", "20", "--lr-schedule", "cosine", "--lr", "1e-3")
    last = mnist / "out" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert 0 < ckpt["elapsed_s"] < 600
    ckpt["elapsed_s"] = 599.4
    torch.save(ckpt, last)
    assert resume(mnist, last, "--max-minutes", "20", "--max-steps", "3").state["step"] == 3
    with open(mnist / "out" / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row["elapsed_s"]) >= 599.4
    assert float(row["lr"]) == pytest.approx(0.5e-3, rel=0.02)  # not 1e-3: the decay went on
    ckpt = torch.load(last, weights_only=True)
    ckpt["elapsed_s"] = 1200.5
    torch.save(ckpt, last)
    assert resume(mnist, last, "--max-minutes", "20").state["step"] == 3


def test_resuming_a_finished_step_budget_trains_nothing(mnist):
    train(mnist, "--max-steps", "3")
    state = resume(mnist, mnist / "out" / "last.pt", "--max-steps", "3").state
    assert state["step"] == 3


def test_resume_refuses_another_network_and_names_the_flags_it_applies(mnist, capsys):
    train(mnist, "--max-steps", "1")
    with pytest.raises(SystemExit, match=r"keeps its --hidden-dims \(\[8, 16, 16\], not \[32, 64\]\)"):
        resume(mnist, mnist / "out" / "last.pt", "--max-steps", "2", "--hidden-dims", "32", "64")
    resume(mnist, mnist / "out" / "last.pt", "--max-steps", "2", "--lr", "1e-4")
    out = capsys.readouterr().out
    assert "except from the command line:" in out and "--max-steps 2" in out and "--lr 0.0001" in out
    ckpt = torch.load(mnist / "out" / "last.pt", weights_only=True)
    assert ckpt["args"]["lr"] == 1e-4 and ckpt["state"]["step"] == 2


def test_resume_defaults_to_the_checkpoints_folder(mnist):
    train(mnist, "--max-steps", "1", out="elsewhere")
    resume(mnist, mnist / "elsewhere" / "last.pt", "--max-steps", "2")
    assert torch.load(mnist / "elsewhere" / "last.pt", weights_only=True)["state"]["step"] == 2


# -- 3: a run is never replaced silently ---------------------------------------------------------


def test_a_new_run_into_an_existing_run_is_refused_or_overwritten_cleanly(mnist):
    train(mnist, "--epochs", "2")
    out = mnist / "out"
    before = (out / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"already holds a run .*--resume .*--overwrite"):
        train(mnist, "--max-steps", "1")
    assert (out / "last.pt").read_bytes() == before
    train(mnist, "--max-steps", "1", "--overwrite")
    assert torch.load(out / "last.pt", weights_only=True)["state"]["step"] == 1
    assert not (out / "samples_epoch002.png").exists()  # no grid of the old run is left behind


def test_out_dir_that_is_a_file_or_cannot_be_made(mnist):
    (mnist / "afile").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        train(mnist, out="afile")
    with pytest.raises(SystemExit, match="cannot write to --out-dir"):
        train(mnist, out="afile/sub")


# -- 4: a CIFAR-10 batch cannot run code ----------------------------------------------------------


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_cifar_batch_runs_nothing(tmp_path):
    write_cifar10(tmp_path / "data")
    assert len(common.load_cifar10(tmp_path / "data", download=False).images) == 100  # real format loads
    marker = tmp_path / "pwned"
    with open(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Exploit(marker), b"labels": []}, f)
    with pytest.raises(SystemExit, match="refused to load posix.system"):
        common.load_cifar10(tmp_path / "data", download=False)
    assert not marker.exists()


# -- 5: NaN never becomes black pictures ----------------------------------------------------------


@pytest.mark.parametrize("extra", [["--guidance", "nan"], ["--weight-decay", "nan"], ["--max-minutes", "nan"],
                                   ["--min-delta", "nan"], ["--lr", "inf"]])
def test_non_finite_training_arguments(mnist, extra):
    with pytest.raises(SystemExit, match="must be a finite number"):
        train(mnist, *extra)


def test_non_finite_sampling_arguments(trained, tmp_path):
    ck = str(trained / "u" / "last.pt")
    with pytest.raises(SystemExit, match="--eta must be a finite number"):
        evaluate.main(evaluate.parse_args(["--checkpoint", ck, "--eta", "nan", "--device", "cpu"]))
    with pytest.raises(SystemExit, match="--guidance must be a finite number"):
        evaluate.main(evaluate.parse_args(["--checkpoint", ck, "--guidance", "nan", "--device", "cpu"]))
    with pytest.raises(SystemExit, match="--eta must be a finite number"):
        ddim_compare.main(ddim_compare.parse_args(["--checkpoint", ck, "--eta", "nan", "--no-fid",
                                                   "--steps", "2", "--out-dir", str(tmp_path / "d")]))


def test_checkpoint_with_nan_weights_is_refused_everywhere(trained, tmp_path):
    ckpt = torch.load(trained / "u" / "last.pt", weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] * float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(SystemExit, match="non-finite"):
        evaluate.main(evaluate.parse_args(["--checkpoint", str(tmp_path / "nan.pt"), "--device", "cpu"]))
    with pytest.raises(SystemExit, match="non-finite"):
        interpolate.main(interpolate.parse_args(["--checkpoint", str(tmp_path / "nan.pt"), "--device", "cpu", "--steps", "4",
                                                 "--out-dir", str(tmp_path / "i")]))
    with pytest.raises(SystemExit, match="non-finite"):
        resume(trained, tmp_path / "nan.pt", "--out-dir", str(tmp_path / "r"))


# -- 6: checks come before the work ------------------------------------------------------------


def test_evaluate_checks_everything_before_sampling(trained, tmp_path, monkeypatch):
    def no_sampling(*a, **k):
        raise AssertionError("sampled before checking its inputs")

    monkeypatch.setattr(evaluate, "sample_from_checkpoint", no_sampling)
    ck = ["--checkpoint", str(trained / "u" / "last.pt"), "--device", "cpu", "--num-samples", "4", "--steps", "4"]
    with pytest.raises(SystemExit, match="train one first"):
        evaluate.main(evaluate.parse_args([*ck, "--classifier", str(tmp_path / "none.pt")]))
    with pytest.raises(SystemExit, match="makes 28 x 28 x 1 images, but cifar10"):
        evaluate.main(evaluate.parse_args([*ck, "--dataset", "cifar10"]))
    (tmp_path / "afile").write_text("x")
    for flag in ("--json", "--save-npz"):
        with pytest.raises(SystemExit, match=f"the folder of {flag} .* is a file"):
            evaluate.main(evaluate.parse_args([*ck, "--classifier", str(trained / "clf.pt"),
                                               flag, str(tmp_path / "afile" / "r.out")]))
    with pytest.raises(SystemExit, match="--num-samples must be"):
        evaluate.main(evaluate.parse_args([*ck, "--num-samples", "0"]))
    with pytest.raises(SystemExit, match="--eta must be in \\[0, 1\\]"):
        evaluate.main(evaluate.parse_args([*ck, "--eta", "-1"]))


def test_ddim_compare_checks_its_out_dir_before_sampling(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(ddim_compare, "draw", lambda *a, **k: pytest.fail("sampled first"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        ddim_compare.main(ddim_compare.parse_args(["--checkpoint", str(trained / "u" / "last.pt"), "--no-fid",
                                                   "--steps", "2", "--out-dir", str(tmp_path / "afile")]))


# -- 7: one error line, no traceback ---------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--hidden-dims", "15", "31", "63"], "multiple of 8"),
    (["--hidden-dims", "8", "8", "2"], "multiple of 4"),
    (["--time-dim", "127"], "--time-dim must be even"),
    (["--image-size", "30"], "divisible by 4 for 3 levels"),
])
def test_networks_that_cannot_be_built(mnist, extra, message):
    with pytest.raises(SystemExit, match=message):
        train(mnist, *extra)


def test_class_labels_beyond_the_model_are_refused(tmp_path):
    raw = write_mnist(tmp_path / "data") / "MNIST" / "raw"
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(96, dtype=np.uint8) % 12)
    with pytest.raises(SystemExit, match="labels run from 0 to 11, but the model has 10 classes"):
        train(tmp_path, "--class-cond", "--max-steps", "1")


def test_interpolate_classes_out_of_range(trained, tmp_path):
    with pytest.raises(SystemExit, match=r"--classes must be in \[0, 10\)"):
        interpolate.main(interpolate.parse_args(["--checkpoint", str(trained / "c" / "last.pt"), "--mode", "noise",
                                                 "--classes", "99", "0", "--device", "cpu", "--steps", "4",
                                                 "--out-dir", str(tmp_path / "i")]))


@pytest.mark.parametrize("damage, message", [
    (lambda c: c.pop("args"), "lacks the training state 'args'"),
    (lambda c: c.pop("optimizer"), "lacks the training state 'optimizer'"),
    (lambda c: c.pop("state"), "lacks the training state 'state'"),
    (lambda c: c.pop("rng"), "lacks the training state 'rng'"),
    (lambda c: c["model"].pop(next(iter(c["model"]))), "does not fit its own model config"),
    (lambda c: c["ema"]["shadow"].pop(next(iter(c["ema"]["shadow"]))), "EMA weights do not match"),
    (lambda c: c["diffusion"].update(schedule="quadratic"), "schedule 'quadratic' .linear or cosine."),
    (lambda c: c["model_config"].update(hidden_dims=[8, 16, 18]), "hidden_dims .8, 16, 18. cannot"),
])
def test_damaged_checkpoints_cannot_be_resumed(trained, tmp_path, damage, message):
    ckpt = torch.load(trained / "u" / "last.pt", weights_only=True)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match=message):
        resume(trained, tmp_path / "bad.pt", "--out-dir", str(tmp_path / "r"))


def test_damaged_checkpoints_cannot_be_sampled(trained, tmp_path):
    ckpt = torch.load(trained / "u" / "last.pt", weights_only=True)
    ckpt["diffusion"]["schedule"] = "quadratic"
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="schedule 'quadratic'"):
        ddim_compare.main(ddim_compare.parse_args(["--checkpoint", str(tmp_path / "bad.pt"), "--no-fid",
                                                   "--steps", "2", "--out-dir", str(tmp_path / "d")]))


def test_truncated_npz(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((20, 28, 28, 1), np.uint8))
    data = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit, match="could not read .*cut.npz"):
        evaluate.main(evaluate.parse_args(["--samples", str(tmp_path / "cut.npz")]))


def test_corrupted_metrics_csv_on_resume(mnist):
    train(mnist, "--max-steps", "2")
    (mnist / "out" / "metrics.csv").write_text("epoch,step\nnot,a number\n")
    with pytest.raises(SystemExit, match="metrics.csv is damaged"):
        resume(mnist, mnist / "out" / "last.pt", "--max-steps", "3")


# -- 8: a 16-bit PNG keeps its picture -------------------------------------------------------------


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.fromarray(ramp).save(tmp_path / "imgs" / name / "x.png")
    assert Image.open(tmp_path / "imgs" / "a" / "x.png").mode.startswith("I")
    data = common.load_image_folder(tmp_path / "imgs", 32, 1)
    img = data.images[0, 0].numpy().astype(int)
    assert img.min() <= 2 and img.max() >= 253
    assert abs(img.mean() - 127.5) < 3  # a ramp, not an all-white square
