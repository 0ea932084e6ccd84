import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quadratic_binary_writes_results_figure_and_events(tmp_path):
    logdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "quadratic.py"),
           f"--flagfile={os.path.join(ROOT, 'experiments', 'quadratic_smoke.cfg')}", f"--logdir={logdir}",
           "--num_epochs=4", "--validation_every=2", "--num_steps=10", "--unroll_length=5",
           "--num_validation_problems=2", "--num_test_problems=3", "--lr_grid=0.01,0.1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((logdir / "results.json").read_text())
    assert results["steps"] == 10
    assert set(results["optimizers"]) == {"lstm", "sgd", "nag", "rmsprop", "adam"}
    for name, entry in results["optimizers"].items():
        assert len(entry["mean_loss"]) == 11
        assert np.isfinite(entry["final_loss_mean"]) and entry["final_loss_std"] >= 0
        assert (entry["learning_rate"] is None) == (name == "lstm")
        assert entry["learning_rate"] in (None, 0.01, 0.1)
    # every optimizer starts from the same held-out problems: identical f(θ_0)
    starts = {entry["mean_loss"][0] for entry in results["optimizers"].values()}
    assert len(starts) == 1
    assert (logdir / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(name.startswith("events") for name in os.listdir(logdir / "train"))
    assert any(name.startswith("events") for name in os.listdir(logdir / "test"))
    assert (logdir / "phi.npz").exists() and (logdir / "checkpoint" / "meta_trainer.npz").exists()
