"""Faults, round two: what a hostile but realistic probe found. A resumed run keeps its
budget, nothing a user made is replaced silently, a huge or tampered size is refused before
it is allocated, and every mistake ends in one line, before the work."""

import errno
import types

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import common
import ddim_compare
import evaluate
import interpolate
import timestep_analysis
import train_diffusion
import train_diffusion_cifar
from helpers import write_idx, write_mnist
from test_robustness import TINY, resume, train


@pytest.fixture
def mnist(tmp_path):
    write_mnist(tmp_path / "data")
    return tmp_path


def saved(ckpt, path, change):
    """A copy of checkpoint file `ckpt` at `path`, changed by change(dict)."""
    c = torch.load(ckpt, weights_only=True)
    change(c)
    torch.save(c, path)
    return path


# -- 1: the printed resume hint keeps the run's budget and schedule -------------------------------


def test_the_resume_hint_keeps_the_step_and_epoch_budget(mnist):
    train(mnist, "--epochs", "3", "--max-steps", "2")
    state = resume(mnist, mnist / "out" / "last.pt").state  # exactly what the hint prints
    assert state["step"] == 2  # --max-steps 2 came from the checkpoint: nothing more to train
    args = train_diffusion.parse_args(["--resume", str(mnist / "out" / "last.pt")])
    args, _, _ = train_diffusion.train_args.prepare_args(args, "mnist")
    assert (args.epochs, args.max_steps, args.max_minutes) == (3, 2, None)


def test_the_resume_hint_keeps_the_time_budget_and_learning_rate(mnist):
    train(mnist, "--max-minutes", "0.0001", "--lr-schedule", "cosine")
    out = mnist / "out"
    before = torch.load(out / "last.pt", weights_only=True)
    state = resume(mnist, out / "last.pt").state
    assert state["step"] == before["state"]["step"]  # the budget was already used up
    args = train_diffusion.parse_args(["--resume", str(out / "last.pt")])
    args, _, _ = train_diffusion.train_args.prepare_args(args, "mnist")
    assert args.max_minutes == 0.0001 and args.lr_schedule == "cosine"


def test_resume_refuses_what_it_cannot_change_and_names_it(mnist):
    train(mnist, "--max-steps", "1")
    with pytest.raises(SystemExit, match=r"--batch-size \(16, not 8\), --optimizer \(muon, not adamw\)"):
        resume(mnist, mnist / "out" / "last.pt", "--lr", "1e-9", "--batch-size", "8", "--optimizer", "adamw")


# -- 3: an output never silently replaces a checkpoint -------------------------------------------


def test_evaluate_json_onto_a_checkpoint_is_refused(tiny_runs, tmp_path):
    args = ["--checkpoint", str(tiny_runs / "u" / "last.pt"), "--num-samples", "4", "--steps", "2",
            "--data-dir", str(tiny_runs / "data"), "--classifier", str(tiny_runs / "clf.pt"), "--device", "cpu"]
    for name, message in (("last.pt", "must end in .json"), ("report.json", "holds a checkpoint, which this would replace")):
        target = tmp_path / name  # a checkpoint, whatever its name
        target.write_bytes((tiny_runs / "u" / "last.pt").read_bytes())
        with pytest.raises(SystemExit, match=message):
            evaluate.main(evaluate.parse_args([*args, "--json", str(target)]))
        common.load_checkpoint(target)  # untouched


def test_train_classifier_onto_a_checkpoint_is_refused_before_training(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "train_classifier", lambda a: pytest.fail("trained first"))
    target = tmp_path / "last.pt"
    target.write_bytes((tiny_runs / "u" / "last.pt").read_bytes())
    for out, message in ((target, "holds a checkpoint"), (tmp_path, "is a folder")):
        with pytest.raises(SystemExit, match=message):
            evaluate.main(evaluate.parse_args(["train-classifier", "--data-dir", str(tiny_runs / "data"),
                                               "--out", str(out), "--device", "cpu"]))
    common.load_checkpoint(target)


# -- 4: non-finite samples never become a picture or a score ------------------------------------


@pytest.mark.parametrize("eta", ["1e30", "1e308", "-0.5"])
def test_eta_outside_0_1_is_refused(tiny_runs, tmp_path, eta):
    with pytest.raises(SystemExit, match="--eta must be in"):
        evaluate.main(evaluate.parse_args(["--checkpoint", str(tiny_runs / "u" / "last.pt"), "--eta", eta,
                                           "--num-samples", "4", "--device", "cpu"]))
    with pytest.raises(SystemExit, match="--eta values must be in"):
        ddim_compare.main(ddim_compare.parse_args(["--checkpoint", str(tiny_runs / "u" / "last.pt"), "--eta", eta,
                                                   "--steps", "2", "--no-fid", "--out-dir", str(tmp_path / "d"),
                                                   "--device", "cpu"]))


def test_a_diverged_checkpoint_is_not_drawn(tiny_runs, tmp_path):
    """Finite weights of 1e30 pass the load, but give NaN images: one error line, no picture."""
    def blow_up(c):
        c["ema"]["shadow"] = {k: v * 1e30 if v.is_floating_point() else v for k, v in c["ema"]["shadow"].items()}
    bad = saved(tiny_runs / "u" / "last.pt", tmp_path / "bad.pt", blow_up)
    with pytest.raises(SystemExit, match="non-finite"):
        interpolate.main(interpolate.parse_args(["--checkpoint", str(bad), "--mode", "noise", "--steps", "2",
                                                 "--frames", "2", "--out-dir", str(tmp_path / "i"), "--device", "cpu"]))
    assert not (tmp_path / "i" / "noise_interpolation.png").exists()
    with pytest.raises(SystemExit, match="non-finite"):
        evaluate.main(evaluate.parse_args(["--checkpoint", str(bad), "--num-samples", "4", "--steps", "2",
                                           "--data-dir", str(tiny_runs / "data"), "--classifier",
                                           str(tiny_runs / "clf.pt"), "--device", "cpu"]))


# -- 6: sizes are bounded before anything is allocated --------------------------------------------


@pytest.mark.parametrize("change, message", [
    (lambda c: c["diffusion"].update(timesteps=2_000_000_000), "timesteps 2000000000"),
    (lambda c: c["diffusion"].update(timesteps=-5), r"timesteps -5 \(a whole number in \[1, 100,000\]\)"),
    (lambda c: c["diffusion"].update(timesteps=20.0), "timesteps 20.0"),
    (lambda c: c["model_config"].update(hidden_dims=[8, 16, 4096]), "hidden_dims"),
    (lambda c: c["model_config"].update(image_size=65536), "image_size 65536"),
    (lambda c: c.update(kind=["mnist"]), "unknown model kind"),
    (lambda c: c.update(args="lr=3e-3"), "training arguments are not a dict"),
])
def test_tampered_configs_are_refused_on_load(tiny_runs, tmp_path, change, message):
    bad = saved(tiny_runs / "u" / "last.pt", tmp_path / "bad.pt", change)
    with pytest.raises(SystemExit, match=message):
        common.load_checkpoint(bad)


@pytest.mark.parametrize("run, message", [
    (lambda r, t: train(r, "--timesteps", "2000000000"), "--timesteps must be a whole number in"),
    (lambda r, t: train(r, "--reference-size", "100000000"), "--reference-size must be"),
    (lambda r, t: train(r, "--image-size", "65536"), "--image-size must be"),
    (lambda r, t: train(r, "--hidden-dims", "8", "16", "4096"), "--hidden-dims: at most"),
    (lambda r, t: train_diffusion_cifar.main(train_diffusion_cifar.parse_args(
        ["--timesteps", "2000000000", "--device", "cpu", "--out-dir", str(r / "c")])), "--timesteps must be"),
    (lambda r, t: interpolate.main(interpolate.parse_args(
        ["--checkpoint", str(t / "u" / "last.pt"), "--frames", "1000000000", "--device", "cpu",
         "--out-dir", str(r / "i")])), "--frames must be"),
    (lambda r, t: evaluate.main(evaluate.parse_args(
        ["--checkpoint", str(t / "u" / "last.pt"), "--num-samples", "1000000000", "--device", "cpu"])),
     "--num-samples must be"),
    (lambda r, t: timestep_analysis.main(timestep_analysis.parse_args(
        ["--data-dir", str(t / "data"), "--loss-points", "1000000000", "--out-dir", str(r / "a")])),
     "--loss-points must be"),
    (lambda r, t: benchmark.main(benchmark.parse_args(["--train-batch", "1000000000", "--device", "cpu"])),
     "--train-batch must be"),
])
def test_huge_size_arguments_are_refused(mnist, tiny_runs, run, message):
    with pytest.raises(SystemExit, match=message):
        run(mnist, tiny_runs)


# -- 7: one error line, never a traceback ---------------------------------------------------------


@pytest.mark.parametrize("seed", ["100000000000000000000000", "-1", "1e23"])
def test_seeds_out_of_range_are_an_argument_error(seed, capsys):
    for parse in (train_diffusion.parse_args, evaluate.parse_args, interpolate.parse_args):
        with pytest.raises(SystemExit) as e:
            parse(["--seed", seed])
        assert e.value.code == 2 and "seed must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        interpolate.parse_args(["--seeds", "0", seed])


@pytest.mark.parametrize("change, message", [
    (lambda c: c["args"].update(lr="0.003"), "lr have the wrong type"),
    (lambda c: c["args"].update(batch_size="16"), "batch_size have the wrong type"),
    (lambda c: c["state"].update(step="2"), "state step have the wrong type"),
    (lambda c: c["rng"][0].update(train=torch.zeros(3, dtype=torch.uint8)), "damaged random-number state"),
])
def test_damaged_training_state_is_refused_on_resume(mnist, tmp_path, change, message):
    train(mnist, "--max-steps", "2")
    bad = saved(mnist / "out" / "last.pt", mnist / "out" / "last.pt", change)
    with pytest.raises(SystemExit, match=message):
        resume(mnist, bad, "--max-steps", "3")


def test_classifier_labels_out_of_range(tmp_path):
    write_mnist(tmp_path / "data")
    write_idx(tmp_path / "data" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", np.full(96, 12, np.uint8))
    with pytest.raises(SystemExit, match="labels run from 12 to 12"):
        evaluate.main(evaluate.parse_args(["train-classifier", "--data-dir", str(tmp_path / "data"), "--epochs", "1",
                                           "--out", str(tmp_path / "clf.pt"), "--device", "cpu"]))


def test_decompression_bomb_in_an_image_folder(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.new("L", (32, 32)).save(tmp_path / "imgs" / name / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 x 32 is then more than twice the limit
    with pytest.raises(SystemExit, match="could not read image .*x.png"):
        common.load_image_folder(tmp_path / "imgs", 32, 1)


def test_a_full_disk_names_the_disk_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full(obj, f, *a, **k):
        open(f, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    (tmp_path / "best.pt").write_bytes(b"the good one")
    with pytest.raises(SystemExit, match=f"No space left on device .is the disk at {tmp_path} full"):
        common.save_checkpoint({"x": 1}, tmp_path / "best.pt")
    assert (tmp_path / "best.pt").read_bytes() == b"the good one"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("where", ["start-up", "sampling"])
def test_ctrl_c_anywhere_exits_130_with_one_line(tiny_runs, tmp_path, monkeypatch, capsys, where):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    if where == "start-up":
        monkeypatch.setattr(common, "load_dataset", interrupt)
        main, argv = train_diffusion.main, [*TINY, "--data-dir", str(tiny_runs / "data"), "--out-dir", str(tmp_path / "t")]
        parse = train_diffusion.parse_args
    else:
        monkeypatch.setattr(common, "sample", interrupt)
        main, parse = evaluate.main, evaluate.parse_args
        argv = ["--checkpoint", str(tiny_runs / "u" / "last.pt"), "--num-samples", "4", "--steps", "2",
                "--data-dir", str(tiny_runs / "data"), "--classifier", str(tiny_runs / "clf.pt"), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        common.run(main, lambda: parse(argv))
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err


def test_a_malicious_checkpoint_is_refused_without_torchs_advice(tmp_path):
    torch.save({"kind": "mnist", "evil": types.SimpleNamespace(x=1)}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit) as e:
        common.load_checkpoint(tmp_path / "evil.pt")
    assert "could run code" in str(e.value) and "weights_only=False" not in str(e.value)


# -- 8: every output path and index is checked before the work ------------------------------------


def test_benchmark_output_paths_are_checked_before_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "matmul_peak_gflops", lambda *a: pytest.fail("timed first"))
    (tmp_path / "file").write_text("")
    for extra, message in ((["--json", str(tmp_path)], "is a folder"),
                           (["--json", str(tmp_path / "missing" / "b.txt")], "must end in .json"),
                           (["--out-dir", str(tmp_path / "file" / "sub")], "cannot write|is a file")):
        with pytest.raises(SystemExit, match=message):
            benchmark.main(benchmark.parse_args(["--quick", "--device", "cpu", *extra]))


def test_evaluate_grid_extension_is_checked_before_sampling(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "sample_from_checkpoint", lambda *a, **k: pytest.fail("sampled first"))
    with pytest.raises(SystemExit, match="--save-grid .*grid.pt must end in .png"):
        evaluate.main(evaluate.parse_args(["--checkpoint", str(tiny_runs / "u" / "last.pt"), "--num-samples", "4",
                                           "--save-grid", str(tmp_path / "grid.pt"), "--device", "cpu"]))


@pytest.mark.parametrize("extra, message", [(["--indices", "0", "99999"], "--indices must be in"),
                                            (["--data-dir", "MISSING"], "MISSING|offline|not found|download")])
def test_interpolate_checks_images_before_any_mode_writes(tiny_runs, tmp_path, extra, message):
    argv = ["--checkpoint", str(tiny_runs / "u" / "last.pt"), "--steps", "2", "--frames", "2",
            "--data-dir", str(tiny_runs / "data"), "--out-dir", str(tmp_path / "i"), "--device", "cpu"]
    if extra[0] == "--data-dir":
        argv[argv.index("--data-dir") + 1] = str(tmp_path / extra[1])
        extra = []
    with pytest.raises(SystemExit, match=message):
        interpolate.main(interpolate.parse_args([*argv, *extra]))
    assert not (tmp_path / "i" / "noise_interpolation.png").exists()


# -- 9: small ones ------------------------------------------------------------------------------


def test_a_folder_given_as_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="is a folder; give the checkpoint file"):
        common.load_checkpoint(tmp_path)


def test_class_on_an_unconditional_model(tiny_runs, tmp_path):
    with pytest.raises(SystemExit, match="--class needs a class-conditional checkpoint"):
        ddim_compare.main(ddim_compare.parse_args(["--checkpoint", str(tiny_runs / "u" / "last.pt"), "--class", "99",
                                                   "--no-fid", "--steps", "2", "--out-dir", str(tmp_path / "d")]))


def test_vlb_stride_beyond_the_timesteps_is_refused(tiny_runs, tmp_path):
    with pytest.raises(SystemExit, match="--vlb-stride 100 is more than the checkpoint's 20 timesteps"):
        timestep_analysis.main(timestep_analysis.parse_args(
            ["--checkpoint", str(tiny_runs / "u" / "last.pt"), "--data-dir", str(tiny_runs / "data"),
             "--vlb-stride", "100", "--out-dir", str(tmp_path / "a"), "--device", "cpu"]))


def test_a_resume_after_ctrl_c_at_an_epochs_last_step_prints_no_zero_rate(mnist, monkeypatch, capsys):
    from test_robustness import interrupt_at_call
    interrupt_at_call(monkeypatch, 5)  # the last of the epoch's 80 / 16 steps
    with pytest.raises(SystemExit):
        train(mnist, "--epochs", "2")
    monkeypatch.undo()
    capsys.readouterr()
    resume(mnist, mnist / "out" / "last.pt")  # the epoch's last step is done: it validates at once
    out = capsys.readouterr().out
    assert "epoch 1 step 5" in out and " 0 img/s" not in out
