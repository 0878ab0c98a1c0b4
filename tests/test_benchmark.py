"""benchmark.py runs, reports what it promises, and refuses bad arguments (speed itself is not tested)."""

import json

import pytest

import benchmark


def test_benchmark_reports_every_row(tmp_path):
    out = benchmark.main(benchmark.parse_args(
        ["--models", "mnist", "--batch-sizes", "2", "--train-batch", "4", "--train-steps", "1", "--repeats", "1",
         "--ddpm-probe", "2", "--json", str(tmp_path / "b.json"), "--out-dir", str(tmp_path), "--device", "cpu"]))
    tasks = [r["task"] for r in out["rows"]]
    assert tasks == ["train", "forward", "ddim-10", "ddim-50", "ddpm-1000 (timed 2 steps)"]
    assert all(r["images_per_s"] > 0 for r in out["rows"])
    train = out["rows"][0]
    assert train["params_m"] == 0.56 and train["peak_mem_mb"] > 0 and train["batch"] == 4
    assert set(out["env"]) >= {"torch", "threads", "device"}
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["task"] == "train"
    assert "| model |" in (tmp_path / "benchmark.md").read_text()


def test_benchmark_bad_arguments():
    with pytest.raises(SystemExit, match="unknown --models"):
        benchmark.main(benchmark.parse_args(["--models", "imagenet", "--device", "cpu"]))
    with pytest.raises(SystemExit, match="at least 1"):
        benchmark.main(benchmark.parse_args(["--repeats", "0", "--device", "cpu"]))
