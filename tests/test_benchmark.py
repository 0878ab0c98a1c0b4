"""benchmark.py runs, reports what it promises, and refuses bad arguments (speed itself is not tested)."""

import json

import pytest

import benchmark
import diffusion
import optimizers


def muon_flops():
    """FLOPs of one Muon step on the default MNIST network, in closed form: five Newton-Schulz
    iterations, each X X^T (2 m^2 n FLOPs), A A (2 m^3) and (b A + c A A) X (2 m^2 n) per
    m x n matrix, m <= n."""
    matrices = optimizers.muon_param_groups(diffusion.DiffusionModel(self_cond=True))[0]["params"]
    shapes = [sorted((len(w), w[0].numel())) for w in matrices]
    return sum(5 * (4 * m * m * n + 2 * m ** 3) for m, n in shapes)


def forward_flops_by_hand():
    import torch
    model, flops = diffusion.DiffusionModel(self_cond=True), []

    def hook(m, inputs, out):
        k = m.kernel_size[0] * m.kernel_size[1] if isinstance(m, torch.nn.Conv2d) else 1
        flops.append(2 * out[0].numel() * m.weight.shape[1] * k)  # one image: out[0]
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long))
    return sum(flops)


def test_benchmark_reports_every_row(tmp_path):
    out = benchmark.main(benchmark.parse_args(
        ["--models", "mnist", "--batch-sizes", "2", "--train-batch", "4", "--train-steps", "1", "--repeats", "1",
         "--ddpm-probe", "2", "--json", str(tmp_path / "b.json"), "--out-dir", str(tmp_path), "--device", "cpu"]))
    tasks = [r["task"] for r in out["rows"]]
    assert tasks == ["train", "forward", "ddim-10", "ddim-50", "ddpm-1000 (timed 2 steps)"]
    assert all(r["images_per_s"] > 0 for r in out["rows"])
    train = out["rows"][0]
    n_params = sum(p.numel() for p in diffusion.DiffusionModel(self_cond=True).parameters())
    assert train["params_m"] == round(n_params / 1e6, 2) and train["peak_mem_mb"] > 0 and train["batch"] == 4
    env = out["env"]
    assert set(env) >= {"torch", "threads", "device"} and env["matmul_peak_gflops"] > 0
    # the peak is the faster of one large matmul (BLAS) and one large convolution (oneDNN)
    assert env["conv_peak_gflops"] > 0 and env["peak_gflops"] == max(env["matmul_peak_gflops"],
                                                                     env["conv_peak_gflops"])
    # a forward pass's FLOPs, counted by hand: 2 per multiply-add of every conv and linear
    # layer at its output size (torch's counter does not see the fused attention kernel on the
    # CPU: its 0.6 MFLOPs, 0.7% of the pass, are left out of the benchmark's figures)
    assert out["rows"][1]["gflop_per_image"] == pytest.approx(forward_flops_by_hand() / 1e9, rel=1e-6)
    # a training step costs about three forward passes (backward ~ 2x forward), four when
    # self-conditioning makes its first call (on half the steps), plus the default optimizer's
    # work, which does not grow with the batch (muon_flops)
    network = out["rows"][0]["gflop_per_image"] - muon_flops() / 4 / 1e9  # batch 4
    assert 2.5 < network / out["rows"][1]["gflop_per_image"] < 4.5
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["task"] == "train"
    assert "| model |" in (tmp_path / "benchmark.md").read_text()


def test_benchmark_bad_arguments():
    with pytest.raises(SystemExit, match="unknown --models"):
        benchmark.main(benchmark.parse_args(["--models", "imagenet", "--device", "cpu"]))
    with pytest.raises(SystemExit, match="at least 1"):
        benchmark.main(benchmark.parse_args(["--repeats", "0", "--device", "cpu"]))


def test_flop_counter_against_closed_forms():
    import torch
    a, b = torch.randn(8, 16), torch.randn(16, 32)
    assert benchmark.count_flops(lambda: a @ b) == 2 * 8 * 16 * 32
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert benchmark.count_flops(lambda: conv(x)) == 2 * 2 * 4 * 10 * 10 * 3 * 3 * 3


def test_benchmark_phases_split_the_training_step():
    """--phases: the four phases of a training step, whose FLOPs add up to the whole step's
    (the same steps and coin flips), the optimizer's being Muon's Newton-Schulz products."""
    out = benchmark.main(benchmark.parse_args(
        ["--models", "mnist", "--no-sampling", "--train-batch", "4", "--train-steps", "2", "--repeats", "1",
         "--phases", "--device", "cpu"]))
    train, *phases, forward = out["rows"]
    assert [r["task"] for r in phases] == ["train: forward", "train: backward", "train: optimizer", "train: EMA"]
    assert forward["task"] == "forward" and all(r["ms_per_step"] > 0 for r in [train] + phases)
    assert sum(r.get("gflop_per_image", 0) for r in phases) == pytest.approx(train["gflop_per_image"])
    assert "gflops" not in phases[3]  # the EMA is elementwise: no matmul or convolution FLOPs
    assert phases[2]["gflop_per_image"] == pytest.approx(muon_flops() / 4 / 1e9)  # batch 4
    # backward costs about twice the one network call it differentiates; the forward phase
    # makes one call, or two when self-conditioning makes its first: 2x or 1x the forward phase
    assert 0.9 < phases[1]["gflop_per_image"] / phases[0]["gflop_per_image"] < 2.1
