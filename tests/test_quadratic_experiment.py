"""The quadratic binary end to end, its flags (shared with the other binaries through experiments/common_flags.py,
with its own defaults), and the reporting all binaries share (colours, labels, titles, figure)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from l2l_tf import reporting
from l2l_tf.rules import LSTMUpdateRule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


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
    # the rule as the registry names it; how it ran recorded beside it, never in it
    assert results["rule"] == {"name": "lstm", "config": LSTMUpdateRule(20, 20, "none", output_scale=1.0).get_config()}
    assert results["implementation"] == "auto"
    # what defines the run, for every binary: rule, seed, the flags, the validation history (one list per phase)
    assert results["seed"] == 0
    assert results["flags"]["num_epochs"] == 4 and results["flags"]["lr_grid"] == ["0.01", "0.1"]
    assert results["flags"]["logdir"] == str(logdir) and "helpfull" not in results["flags"]
    assert [[epoch for epoch, _ in history] for history in results["validation_history"]] == [[2, 4]]
    assert results["resumed_from"] == [None]
    # the spread over test problems, beside the mean
    for entry in results["optimizers"].values():
        assert len(entry["q25"]) == len(entry["q75"]) == 11
        assert all(lo <= hi for lo, hi in zip(entry["q25"], entry["q75"]))
    # the tuning scores: every learning rate of every baseline
    assert set(results["tuning"]) == {"sgd", "nag", "rmsprop", "adam"}
    assert all([lr for lr, _ in scores] == [0.01, 0.1] for scores in results["tuning"].values())
    # TensorBoard: the flags as text, the figure as an image, the tuning scores (beside the library's training logs)
    tags = tensorboard_tags(logdir / "test")
    assert "flags" in tags["text"] and "figure" in tags["images"], tags
    assert {"tuning/sgd", "tuning/adam"} <= set(tags["text"]), tags
    assert {"tuned_learning_rate/adam"} <= set(tags["scalars"]), tags
    text = tensorboard_text(logdir / "test", "flags")
    assert "num_epochs" in text and "lr_grid" in text
    assert "0.01" in tensorboard_text(logdir / "test", "tuning/adam")


def tensorboard_tags(directory):
    """{"text"|"images"|"scalars": [tag, ...]} of the TF2 summaries in `directory` (all stored as tensors)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator

    accumulator = plugin_event_accumulator.EventAccumulator(str(directory), size_guidance={"tensors": 0})
    accumulator.Reload()
    kinds = {}
    for plugin in ("text", "images", "scalars"):
        try:
            kinds[plugin] = sorted(accumulator.PluginTagToContent(plugin))
        except KeyError:  # no summary of that kind
            kinds[plugin] = []
    return kinds


def tensorboard_text(directory, tag):
    """The text of the last `tag` text summary in `directory`."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import plugin_event_accumulator

    accumulator = plugin_event_accumulator.EventAccumulator(str(directory), size_guidance={"tensors": 0})
    accumulator.Reload()
    event = accumulator.Tensors(tag)[-1]
    return "\n".join(v.decode() for v in np.ravel(tf.make_ndarray(event.tensor_proto)))


def test_binary_keeps_its_defaults():
    """The flags shared with the other binaries keep the quadratic binary's defaults (README: same results)."""
    code = ("import sys; sys.argv = ['quadratic.py']; from experiments import quadratic; from absl import flags; "
            "flags.FLAGS(['quadratic.py']); F = flags.FLAGS; import json; print(json.dumps({name: F[name].value "
            "for name in ['logdir', 'seed', 'distribution', 'batch_size', 'num_dims', 'hidden1', 'hidden2', "
            "'preprocess', 'output_scale', 'implementation', 'num_epochs', 'num_steps', 'unroll_length', "
            "'learning_rate', 'clip_norm', 'second_derivatives', 'validation_every', 'num_validation_problems', "
            "'num_test_problems', 'patience', 'baselines', 'lr_grid']}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert values == {
        "logdir": "/tmp/l2l_quadratic", "seed": 0, "distribution": "gaussian", "batch_size": 128, "num_dims": 10,
        "hidden1": 20, "hidden2": 20, "preprocess": "none", "output_scale": 1.0, "implementation": "auto",
        "num_epochs": 4000, "num_steps": 100, "unroll_length": 20, "learning_rate": 1e-2, "clip_norm": None,
        "second_derivatives": True, "validation_every": 250, "num_validation_problems": 20, "num_test_problems": 100,
        "patience": None, "baselines": ["sgd", "nag", "rmsprop", "adam"],
        "lr_grid": [f"{10 ** (k / 4):.4g}" for k in range(-16, 5)]}


def test_shared_flags_show_in_short_help_and_bad_values_are_usage_errors():
    binary = os.path.join(ROOT, "experiments", "quadratic.py")
    result = subprocess.run([sys.executable, binary, "--helpshort"], capture_output=True, text=True, env=ENV,
                            timeout=120)  # absl exits 1 after printing the help
    assert "experiments/quadratic.py:" in result.stdout, result.stderr[-3000:]
    for flag in ("--distribution", "--preprocess", "--implementation", "--num_epochs", "--lr_grid"):
        assert flag in result.stdout, flag
    assert "LogAndSign" in result.stdout  # --preprocess' help is l2l_tf.rules.preprocess.HELP
    result = subprocess.run([sys.executable, binary, "--baselines=sgd,adagrad"], capture_output=True, text=True,
                            env=ENV, timeout=120)
    assert result.returncode != 0 and "--baselines" in result.stderr


# ---- reporting: colours, labels and titles for any name ----
def _hex(color):
    from matplotlib import colors

    return colors.to_hex(color)


def test_known_optimizers_keep_their_colours_and_labels():
    assert {name: reporting.color(name) for name in reporting.COLORS} == {
        "lstm": "tab:red", "sgd": "tab:green", "momentum": "tab:olive", "nag": "tab:blue", "rmsprop": "tab:purple",
        "adam": "tab:orange"}
    assert [reporting.label(n) for n in ("lstm", "sgd", "momentum", "nag", "rmsprop", "adam")] == [
        "LSTM", "SGD", "Momentum", "NAG", "RMSprop", "ADAM"]
    assert reporting.colors(["adam", "lstm"]) == {"adam": "tab:orange", "lstm": "tab:red"}


def test_unknown_optimizers_get_distinct_deterministic_colours_and_readable_labels():
    names = ["lstm", "lstm_sub", "lstm_single", "sgd", "nag", "rmsprop", "adam"]
    mapping = reporting.colors(names)
    assert list(mapping) == names
    assert mapping["lstm"] == "tab:red" and mapping["adam"] == "tab:orange"
    assert len({_hex(c) for c in mapping.values()}) == len(names)                  # all lines apart
    known = {_hex(c) for c in reporting.COLORS.values()}
    assert _hex(mapping["lstm_sub"]) not in known and _hex(mapping["lstm_single"]) not in known
    assert reporting.colors(reversed(names)) == mapping                          # the set decides, not the order
    assert reporting.color("lstm_sub") == reporting.color("lstm_sub") in reporting.palette()
    many = [f"rule_{i}" for i in range(len(reporting.palette()))]
    assert len(set(reporting.colors(many).values())) == len(many)
    assert reporting.label("lstm_single") == "LSTM (single)" and reporting.label("lstm_sub") == "LSTM (sub)"
    assert reporting.label("yogi") == "Yogi" and reporting.label("adam_warm") == "ADAM (warm)"
    assert reporting.is_learned("lstm_sub") and not reporting.is_learned("adam")
    # deterministic across processes (not Python's salted hash)
    code = ("from l2l_tf import reporting; import json; "
            "print(json.dumps([reporting.color('lstm_sub'), reporting.colors(['lstm', 'lstm_sub', 'lstm_single'])]))")
    outputs = set()
    for hash_seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                env=dict(ENV, PYTHONHASHSEED=hash_seed))
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.add(result.stdout.strip().splitlines()[-1])
    assert outputs == {json.dumps([reporting.color("lstm_sub"),
                                   reporting.colors(["lstm", "lstm_sub", "lstm_single"])])}


@pytest.mark.parametrize("name, experiment, title", [
    ("steps200", "mnist", "MNIST, 200 steps"),                       # listed
    ("layers2", "mnist", "MNIST, 2 hidden layers"),
    ("units80", "mnist", "MNIST, 80 units"),                         # derived
    ("layers2", "cifar10", "CIFAR-10, 2 layers"),
    ("wide_relu", "cifar10", "CIFAR-10, wide ReLU"),
])
def test_setting_titles_for_any_name(name, experiment, title):
    assert reporting.setting_title(name, experiment) == title
    assert reporting.quadratic_title(10, "gaussian") == "Quadratics (10-d, gaussian)"


def test_figure_with_unknown_optimizers(tmp_path):
    curve = lambda scale: {"learning_rate": None, "mean_loss": list(scale * np.exp(-np.arange(11) / 3.0)),
                           "final_loss_mean": 0.0, "final_loss_std": 0.0}
    results = {"lstm": curve(1.0), "lstm_sub": curve(0.9), "lstm_single": curve(0.8), "adam": dict(curve(1.1),
               learning_rate=0.01), "_raw": {}}
    path = tmp_path / "figure.png"
    reporting.plot_curves(str(path), [("CIFAR-10, base", results), ("CIFAR-10, 2 layers", results)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    reporting.write_json(str(tmp_path / "results.json"), reporting.public(results))
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"lstm", "lstm_sub", "lstm_single", "adam"}


def test_figure_shades_the_quartile_band_when_the_summary_has_one(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from l2l_tf import evaluation

    losses = np.exp(-np.arange(11) / 3.0) * np.linspace(0.5, 1.5, 9)[:, None]
    with_band, without_band = evaluation.summarize(losses), evaluation.summarize(losses, 0.1)
    without_band = {k: v for k, v in without_band.items() if k not in ("q25", "q75")}
    calls = []
    real = Axes.fill_between
    monkeypatch.setattr(Axes, "fill_between", lambda self, *a, **k: calls.append((a, k)) or real(self, *a, **k))
    reporting.plot_curves(str(tmp_path / "figure.png"), [("band", {"lstm": with_band, "adam": without_band})])
    assert len(calls) == 1                                   # the band of the summary that has quartiles only
    (steps, low, high), options = calls[0]
    np.testing.assert_array_equal(low, with_band["q25"])
    np.testing.assert_array_equal(high, with_band["q75"])
    assert options["alpha"] <= 0.3 and options["color"] == reporting.color("lstm")
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
