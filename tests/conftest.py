import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Tiny data, a classifier, an unconditional and a conditional checkpoint (T = 20), made
    once for the experiment and robustness tests, which only read them."""
    import evaluate
    import train_diffusion
    from helpers import tiny_mnist_args, write_mnist
    root = tmp_path_factory.mktemp("runs")
    write_mnist(root / "data", n_train=96, n_test=40)
    evaluate.main(evaluate.parse_args(["train-classifier", "--data-dir", str(root / "data"), "--epochs", "1",
                                       "--out", str(root / "clf.pt"), "--device", "cpu"]))
    common_args = [*tiny_mnist_args(timesteps=20, sample_steps=4), "--epochs", "1", "--data-dir", str(root / "data")]
    train_diffusion.main(train_diffusion.parse_args([*common_args, "--out-dir", str(root / "u")]))
    train_diffusion.main(train_diffusion.parse_args([*common_args, "--class-cond", "--out-dir", str(root / "c")]))
    return root
