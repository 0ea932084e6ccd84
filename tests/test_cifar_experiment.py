"""The CIFAR experiment (paper Fig. 7): the convnet's variables split between the two LSTMs, the binary's flags,
flagfiles found by bare name (every binary), and experiments/cifar_smoke.cfg end to end on the offline CIFAR-10 subset:
results for all three settings, the figure, and a rerun that resumes every meta-training and reuses every evaluation.

Binaries run as subprocesses (absl flags are process-global). The smoke run needs the CIFAR-10 python batches in
../shared/data/cifar-10-batches-py (beside the repository) and is skipped without them."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # experiments/ (common_flags) from the source checkout

from experiments import common_flags  # noqa: E402
from l2l_tf.problems.cifar import build_convnet, cifar_families, two_lstm_rule  # noqa: E402
from l2l_tf.rules import LSTMUpdateRule, Partitioned, param_specs  # noqa: E402

CIFAR = os.path.join(ROOT, "experiments", "cifar.py")
MNIST = os.path.join(ROOT, "experiments", "mnist.py")
CIFAR_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar-10-batches-py")
needs_cifar = pytest.mark.skipif(not os.path.isdir(CIFAR_DIR), reason=f"no CIFAR-10 python batches in {CIFAR_DIR}")
SMOKE_SECONDS = 300


def environment():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2")


def run(command, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, env=environment(), cwd=cwd,
                          timeout=timeout)


def messages(stderr):
    """stderr without TensorFlow's C++ start-up log."""
    noise = ("I0000 ", "W0000 ", "WARNING: All log messages before absl", "To enable the following instructions")
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(noise)]


# ---- the two LSTMs' partition of the convnet ----
@pytest.mark.parametrize("num_classes", [10, 5, 2, 8])
def test_every_convnet_variable_is_in_exactly_one_group(num_classes):
    model = build_convnet(num_classes, seed=1)
    specs = param_specs(model.trainable_variables)
    rule = two_lstm_rule(output_scale=0.1)
    groups = rule.groups(specs)
    assert len(groups) == len(specs) == len(model.trainable_variables) == 14
    conv_kernels = [spec.name for spec in specs if spec.rank == 4]
    assert len(conv_kernels) == 3 and all("conv" in name and name.endswith("kernel") for name in conv_kernels)
    for spec, group in zip(specs, groups):
        assert group == ("conv" if spec.name in conv_kernels else "other"), (spec.name, group)
    # the optimizer state holds each tensor once, under its group only
    state = rule.init_state(specs)
    assert len(state.per_coordinate) == len(specs)
    assert [list(entry) for entry in state.per_coordinate] == [[group] for group in groups]
    assert set(state.shared) == {"conv", "other"}
    # each group its own φ
    phi = rule.init_phi(0)
    assert set(phi) == {"conv", "other"}
    assert not np.array_equal(np.asarray(phi["conv"]["lstm1"]["w"]), np.asarray(phi["other"]["lstm1"]["w"]))


def test_families_name_the_variables_the_rule_routes():
    """The family's ParamSpecs (what meta-training routes by) are the model's variable paths."""
    rng = np.random.default_rng(0)
    split = (rng.uniform(size=(40, 32, 32, 3)).astype(np.float32), rng.integers(0, 2, 40).astype(np.int32))
    family = cifar_families({"test": split}, num_classes=2, batch_size=8, examples_per_problem=20)["test"]
    specs = family.param_specs()
    groups = two_lstm_rule().groups(specs)
    assert sorted(spec.name.split("/", 1)[1] for spec, group in zip(specs, groups) if group == "conv") == [
        "conv1/kernel", "conv2/kernel", "conv3/kernel"]
    assert groups.count("other") == len(specs) - 3
    problem = family.sample(7)
    assert len(problem.params) == len(specs) and len(problem.extra) == 8   # 4 batch norms: mean and variance each
    assert problem.data[0].shape == (20, 32, 32, 3)


# ---- flagfiles by bare name ----
def test_find_flagfile_looks_in_the_working_directory_then_next_to_the_binary(tmp_path, monkeypatch):
    binary_dir, work = tmp_path / "bin", tmp_path / "work"
    binary_dir.mkdir()
    work.mkdir()
    (binary_dir / "both.cfg").write_text("--seed=1\n")
    (binary_dir / "beside.cfg").write_text("--seed=2\n")
    (work / "both.cfg").write_text("--seed=3\n")
    binary = str(binary_dir / "tool.py")
    monkeypatch.chdir(work)
    assert common_flags.find_flagfile("both.cfg", binary) == "both.cfg"                 # the working directory first
    assert common_flags.find_flagfile("beside.cfg", binary) == str(binary_dir / "beside.cfg")
    argv = [binary, "--flagfile=beside.cfg", "--seed=4", "-flagfile", "beside.cfg", "--flagfile=both.cfg", "--",
            "--flagfile=nowhere.cfg"]
    assert common_flags.resolve_flagfiles(argv) == [
        binary, f"--flagfile={binary_dir / 'beside.cfg'}", "--seed=4", "-flagfile", str(binary_dir / "beside.cfg"),
        "--flagfile=both.cfg", "--", "--flagfile=nowhere.cfg"]
    with pytest.raises(ValueError) as error:
        common_flags.resolve_flagfiles([binary, "--flagfile=nowhere.cfg"])
    message = str(error.value)
    assert "\n" not in message and "--flagfile=nowhere.cfg" in message
    assert str(work / "nowhere.cfg") in message and str(binary_dir / "nowhere.cfg") in message
    with pytest.raises(ValueError, match="no such file"):
        common_flags.find_flagfile(str(tmp_path / "absolute.cfg"), binary)


@pytest.mark.parametrize("binary, flagfile", [(CIFAR, "cifar_smoke.cfg"), (CIFAR, "cifar.cfg"),
                                              (MNIST, "mnist_smoke.cfg")], ids=["cifar_smoke", "cifar", "mnist_smoke"])
def test_binaries_find_their_flagfiles_by_bare_name(tmp_path, binary, flagfile):
    """From any working directory a bare name finds the flagfile next to the binary (--only_check_args: absl parses
    and checks every flag, then exits 0)."""
    result = run([binary, f"--flagfile={flagfile}", f"--logdir={tmp_path / 'run'}", "--only_check_args"],
                 cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_flagfile_in_the_working_directory_comes_first(tmp_path):
    (tmp_path / "cifar_smoke.cfg").write_text("--num_test_problems=0\n")
    result = run([CIFAR, "--flagfile=cifar_smoke.cfg", f"--logdir={tmp_path / 'run'}"], cwd=tmp_path, timeout=180)
    assert result.returncode == 1
    assert "--num_test_problems" in result.stderr


@pytest.mark.parametrize("binary", [CIFAR, MNIST], ids=["cifar", "mnist"])
def test_a_missing_flagfile_is_a_one_line_error_naming_where_it_looked(tmp_path, binary):
    result = run([binary, "--flagfile=nowhere.cfg", f"--logdir={tmp_path / 'run'}"], cwd=tmp_path, timeout=180)
    lines = messages(result.stderr)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(lines) == 2 and lines[1] == common_flags.HELP_HINT, lines
    assert lines[0].startswith(common_flags.USAGE_ERROR_PREFIX + "--flagfile=nowhere.cfg: no such file"), lines
    assert str(tmp_path / "nowhere.cfg") in lines[0]
    assert os.path.join(os.path.dirname(binary), "nowhere.cfg") in lines[0]
    assert not result.stdout.strip() and not (tmp_path / "run").exists()


# ---- the binary's own flags, checked when parsed ----
CASES = {
    "--settings=cifar10,cifar3": ["--settings", "cifar3", "cifar10, cifar5, cifar2"],
    "--settings=": ["--settings"],
    "--cifar5_labels=0,1,2": ["--cifar5_labels", "5 distinct CIFAR-10 labels"],
    "--cifar2_labels=0,0": ["--cifar2_labels", "2 distinct"],
    "--cifar2_labels=0,10": ["--cifar2_labels", "0..9"],
    "--output_scales=0.1,-1": ["--output_scales", "positive numbers"],
    "--validation_size=1.5": ["--validation_size", "fraction"],
    "--validation_size=0": ["--validation_size", "fraction"],
    "--cifar_dir=/nonexistent/cifar": ["--cifar_dir", "no such directory"],
    "--cifar_source=tfds --cifar_dir={tmp}": ["--cifar_dir", "tfds"],
    "--examples_per_problem=-1": ["--examples_per_problem"],
    "--scale_selection_epochs=0": ["--scale_selection_epochs", "a positive integer"],
    "--cifar2_num_test_problems=0": ["--cifar2_num_test_problems", "positive"],
    "--cifar5_num_test_problems=-3": ["--cifar5_num_test_problems", "positive"],
    "--batch_size=0": ["--batch_size"],
    "--num_epochs=0": ["--num_epochs=0", "--phi"],
    "--output_init_gain=0": ["--output_init_gain", "positive"],
    "--validation_size=500 --cifar_source=directory --cifar_dir={tmp} --nolstm_single": None,
    "--settings=cifar2 --cifar2_labels=3,5 --output_scales=0.1 --examples_per_problem=0": None,
}


def test_every_cifar_flag_is_checked_when_parsed(tmp_path):
    cases = {argv.format(tmp=tmp_path): expected for argv, expected in CASES.items()}
    code = ("import json, sys; sys.argv = ['cifar.py']; from experiments import cifar; from absl import flags\n"
            "for argv in %r:\n"
            "    flags.FLAGS.unparse_flags()\n"
            "    try:\n"
            "        flags.FLAGS(['cifar.py'] + argv); print(json.dumps([argv, None]))\n"
            "    except flags.Error as error:\n"
            "        print(json.dumps([argv, str(error)]))\n") % [argv.split() for argv in cases]
    result = run(["-c", code], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = {" ".join(argv): error for argv, error in map(json.loads, result.stdout.strip().splitlines())}
    for argv, expected in cases.items():
        if expected is None:
            assert outcomes[argv] is None, (argv, outcomes[argv])
        else:
            assert outcomes[argv] is not None and "\n" not in outcomes[argv], (argv, outcomes[argv])
            for part in expected:
                assert part in outcomes[argv], (argv, part, outcomes[argv])


def test_scale_selection_longer_than_the_first_phase_is_a_usage_error(tmp_path):
    result = run([CIFAR, "--flagfile=cifar_smoke.cfg", f"--logdir={tmp_path / 'run'}", "--scale_selection_epochs=9"],
                 timeout=180)
    lines = messages(result.stderr)
    assert result.returncode == 1 and len(lines) == 2, lines
    assert "--scale_selection_epochs=9 must be at most the first phase's 3 epochs" in lines[0]
    assert not (tmp_path / "run").exists()


# ---- cifar_smoke.cfg end to end ----
LEARNED = {"cifar10": {"lstm", "lstm_single"}, "cifar5": {"lstm", "lstm_sub"}, "cifar2": {"lstm", "lstm_sub"}}
BASELINES = {"sgd", "nag", "rmsprop", "adam"}
RUNS = {"lstm": None, "lstm_single": None, "lstm_sub_cifar5": [5, 6, 7, 8, 9],
        "lstm_sub_cifar2": [2, 3, 4, 5, 6, 7, 8, 9]}


def smoke_command(logdir, *more):
    return [os.path.join("experiments", "cifar.py"), "--flagfile=cifar_smoke.cfg", f"--cifar_dir={CIFAR_DIR}",
            f"--logdir={logdir}", *more]


def evaluation_lines(stderr):
    return [line for line in stderr.splitlines() if "tuned learning rate" in line]


@needs_cifar
def test_smoke_config_end_to_end_then_resumes(tmp_path):
    from l2l_tf import load_phi

    logdir = tmp_path / "run"
    started = time.perf_counter()
    first = run(smoke_command(logdir))   # from the repository root: the bare flagfile name is experiments/'s
    elapsed = time.perf_counter() - started
    assert first.returncode == 0, first.stderr[-3000:]
    assert elapsed < SMOKE_SECONDS, f"the smoke run took {elapsed:.0f} s"
    assert "resumed from epoch" not in first.stdout
    assert len(evaluation_lines(first.stderr)) == 3 * len(BASELINES)
    results = json.loads((logdir / "results.json").read_text())

    assert set(results["settings"]) == set(LEARNED)
    for name, setting in results["settings"].items():
        # cifar_smoke.cfg gives CIFAR-2 its own count (--cifar2_num_test_problems), the others --num_test_problems.
        assert setting["steps"] == 10 and setting["num_test_problems"] == (3 if name == "cifar2" else 2)
        assert set(setting["optimizers"]) == LEARNED[name] | BASELINES
        for opt, entry in setting["optimizers"].items():
            assert set(entry) >= {"learning_rate", "mean_loss", "final_loss_mean", "final_loss_std"}
            assert len(entry["mean_loss"]) == 11 and entry["final_loss_mean"] == entry["mean_loss"][-1]
            assert np.isfinite(entry["final_loss_mean"]) and entry["final_loss_std"] >= 0
            assert (entry["learning_rate"] is None) == (opt in LEARNED[name])
            if opt in BASELINES:
                assert entry["learning_rate"] in (0.01, 0.1)
        assert set(setting["tuning"]) == BASELINES
    assert results["settings"]["cifar10"]["labels"] is None
    assert results["settings"]["cifar5"]["labels"] == [0, 1, 2, 3, 4]
    assert results["settings"]["cifar2"]["labels"] == [0, 1]
    # images per problem: the smoke's 200, capped by CIFAR-2's smallest split (its 198 test images)
    assert results["settings"]["cifar10"]["examples_per_problem"] == 200
    assert results["settings"]["cifar2"]["examples_per_problem"] == 198
    assert results["data"]["images"] == {"train": 4068, "validation": 1017, "test": 1017}

    # the output scale, chosen on validation and stated
    selection = results["output_scale"]
    assert selection["candidates"] == [0.1, 0.01] and selection["chosen"] in (0.1, 0.01)
    assert selection["selection_epochs"] == 2 and set(selection["validation"]) == {"0.1", "0.01"}
    assert selection["chosen"] == min(selection["candidates"], key=lambda s: selection["validation"][f"{s:g}"])

    # each meta-training run: its own checkpoint, rule, labels (the LSTM-subs never see their setting's labels)
    assert set(results["meta_training"]) == set(RUNS)
    for run_name, labels in RUNS.items():
        entry = results["meta_training"][run_name]
        assert entry["labels"] == labels and entry["epochs"] == [3] and entry["resumed_from"] == [None]
        assert os.path.exists(os.path.join(entry["checkpoint"], "meta_trainer.npz"))
        rule = entry["rule"]
        scale = selection["chosen"]
        if run_name == "lstm_single":
            assert rule["name"] == "lstm" and rule["config"]["output_scale"] == scale
        else:
            assert rule["name"] == "partitioned" and set(rule["config"]["rules"]) == {"conv", "other"}
            assert {r["config"]["output_scale"] for r in rule["config"]["rules"].values()} == {scale}
    assert results["meta_training"]["lstm_sub_cifar2"]["examples_per_problem"] == \
        results["settings"]["cifar2"]["examples_per_problem"]

    # what every binary records
    assert results["rule"]["name"] == "partitioned" and results["seed"] == 0
    assert results["flags"]["num_test_problems"] == 2 and results["flags"]["settings"] == list(LEARNED)
    assert len(results["validation_history"]) == len(RUNS) and results["resumed_from"] == [None] * len(RUNS)
    assert all(len(history) == 2 for history in results["validation_history"])   # epochs 2 and 3

    # φ files: the CIFAR-10 two-LSTM (conv + other), the ablation, the LSTM-subs
    rule, phi, metadata = load_phi(logdir / "phi.npz")
    assert isinstance(rule, Partitioned) and set(phi) == {"conv", "other"}
    assert metadata["output_scale"]["chosen"] == selection["chosen"]
    assert isinstance(load_phi(logdir / "phi_lstm_single.npz")[0], LSTMUpdateRule)
    assert load_phi(logdir / "phi_lstm_sub_cifar2.npz")[2]["labels"] == RUNS["lstm_sub_cifar2"]

    # the three-panel figure and TensorBoard
    assert (logdir / "figure.png").stat().st_size > 10_000
    from tensorboard.backend.event_processing import plugin_event_accumulator

    accumulator = plugin_event_accumulator.EventAccumulator(str(logdir / "test"), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert "flags" in accumulator.PluginTagToContent("text")
    assert {"cifar10/tuning/adam", "cifar2/tuning/sgd"} <= set(accumulator.PluginTagToContent("text"))
    assert "figure" in accumulator.PluginTagToContent("images")
    assert {"cifar5/lstm_sub/loss", "cifar10/lstm_single/loss"} <= set(accumulator.PluginTagToContent("scalars"))
    for run_dir in ("lstm/scale_0.1", "lstm/scale_0.01", "lstm_single", "lstm_sub_cifar5", "lstm_sub_cifar2"):
        assert any(f.startswith("events") for f in os.listdir(logdir / "train" / run_dir)), run_dir

    # The same command again: every meta-training resumes from its checkpoint, no setting is evaluated again.
    again = run(smoke_command(logdir))
    assert again.returncode == 0, again.stderr[-3000:]
    for run_dir in ("lstm/scale_0.1", "lstm/scale_0.01", "lstm_single", "lstm_sub_cifar5", "lstm_sub_cifar2"):
        assert os.path.join(run_dir, "meta_trainer.npz") in again.stdout, run_dir
    assert again.stdout.count("resumed from epoch") >= len(RUNS) + 1
    assert evaluation_lines(again.stderr) == []
    assert again.stdout.count("reusing") == 3
    rerun = json.loads((logdir / "results.json").read_text())
    assert rerun["settings"] == results["settings"] and rerun["output_scale"] == selection
    assert rerun["resumed_from"] == [3] * len(RUNS)

    # A changed evaluation flag: that setting is evaluated again (its fingerprint differs), the training resumes.
    changed = run(smoke_command(logdir, "--settings=cifar2", "--baselines=adam"))
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "cifar2: " in changed.stdout and "evaluating again" in changed.stdout
    assert len(evaluation_lines(changed.stderr)) == 1
    assert set(json.loads((logdir / "results.json").read_text())["settings"]["cifar2"]["optimizers"]) == {
        "lstm", "lstm_sub", "adam"}

    # --num_epochs=0 evaluates a given φ alone (no meta-training, hence no ablation and no LSTM-sub).
    shipped = run(smoke_command(tmp_path / "phi_only", "--num_epochs=0", f"--phi={logdir / 'phi.npz'}",
                                "--settings=cifar2", "--baselines=adam", "--lr_grid=0.01"))
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    only = json.loads((tmp_path / "phi_only" / "results.json").read_text())
    assert set(only["settings"]["cifar2"]["optimizers"]) == {"lstm", "adam"}
    assert only["meta_training"] == {} and only["output_scale"]["chosen"] == selection["chosen"]
    assert not (tmp_path / "phi_only" / "checkpoint").exists()


def test_fit_benchmark_runs_on_the_cifar_convnet():
    """`bench_step.py --benchmark=fit --fit_model=cifar` (tiny: what is checked is that it runs and reports)."""
    result = run([os.path.join(ROOT, "experiments", "bench_step.py"), "--benchmark=fit", "--fit_model=cifar",
                  "--fit_steps=3", "--fit_rounds=1", "--fit_implementations=reference,reference_bf16",
                  "--fit_batch_size=16"],
                 timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CIFAR convnet" in result.stdout and "| LearnedOptimizer | reference |" in result.stdout
    assert "| LearnedOptimizer | reference_bf16 |" in result.stdout  # matmul_precision="bfloat16"


@needs_cifar
def test_shipped_cifar10_phi_trains_the_convnet_in_keras():
    """`LearnedOptimizer.from_pretrained("cifar10")` (the φ behind README's CIFAR table) is the two-LSTM rule and trains
    the paper's convnet in `model.fit`: the README example on 512 images, 2 epochs of batch 128."""
    import keras

    from l2l_tf import LearnedOptimizer, datasets

    optimizer = LearnedOptimizer.from_pretrained("cifar10")
    assert isinstance(optimizer.rule, Partitioned) and set(optimizer.rule.rules) == {"conv", "other"}
    assert all(r.output_scale == 0.01 and r.preprocess == "paper" for r in optimizer.rule.rules.values())
    keras.utils.set_random_seed(0)
    x, y = datasets.load_cifar10(directory=CIFAR_DIR)["train"]
    x, y = x[:512], y[:512]
    model = build_convnet(10, seed=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss)
    # The training loss (inference-mode evaluation would read batch-norm moving statistics that 8 steps barely move).
    history = model.fit(x, y, batch_size=128, epochs=2, shuffle=False, verbose=0).history["loss"]
    assert history[0] > 2.0 and history[1] < 0.85 * history[0], history
