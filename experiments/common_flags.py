"""The flags the experiment binaries share, each defined here once with each binary's defaults as arguments, their
checks, and the glue every binary runs through (one-line usage errors, meta-training with the shared flags, what
results.json and TensorBoard record about the run).

    from experiments import common_flags as common
    common.define_run_flags(logdir="/tmp/l2l_mnist")
    common.define_rule_flags(preprocess="paper", output_scale=0.1)
    common.define_meta_training_flags(num_epochs=1000, learning_rate=1e-3, second_derivatives=False,
                                      validation_every=50, num_validation_problems=10)
    common.define_phi_flag()                     # after the meta-training flags
    common.define_curriculum_flags()
    common.define_evaluation_flags(num_test_problems=50, lr_grid=[...])
    ...
    rule, phi = common.starting_point()          # --phi's rule and φ, or the rule of the flags (φ None: fresh)
    phases = common.phases_from_flags()          # --phase → curriculum.Phase values (app.UsageError when bad)
    best_phi = common.meta_train(trainer, epochs, checkpoint_dir=..., logdir=...)   # the shared flags wired in
    ...
    if __name__ == "__main__":
        common.run(main)                         # app.run with one-line usage errors; --flagfile=NAME.cfg is
                                                 # looked for in the working directory, then next to the binary

A binary calls each `define_*` function at most once, at import (absl flags are global). Names, meanings and help
are the same in every binary; only the defaults differ (so each binary's README command gives what it gave before).
The choices of the enums come from the library (`l2l_tf.rules.preprocess`, `l2l_tf.ops`, `l2l_tf.training`).

Every flag is checked when the flags are parsed (absl validators), before a binary does any work: counts are
positive (--num_epochs may be 0: evaluate --phi), --unroll_length divides --num_steps (binaries without curricula),
learning rates parse, baselines exist, --logdir can be written, --phi loads. absl reports a failed check as one
line, "FATAL Flags parsing error: flag --NAME=VALUE: what it allows", and exits 1; `run` reports an app.UsageError
that main raises (a bad --phase, a checkpoint of another run) the same way instead of printing the whole help first.
"""
import hashlib
import os
import sys
import tempfile

from absl import app, flags, logging

from l2l_tf import ops
from l2l_tf.baselines import BASELINES
from l2l_tf.rules import LSTMUpdateRule, load_phi, rule_to_config
from l2l_tf.rules import preprocess as preprocessing
from l2l_tf.training import curriculum
from l2l_tf.training.checkpoints import CheckpointError
from l2l_tf.training.meta_trainer import META_LOSSES

FLAGS = flags.FLAGS

DEFAULT_BASELINES = ("sgd", "nag", "rmsprop", "adam")
RULE_FLAGS = ("hidden1", "hidden2", "preprocess", "output_scale")   # what --phi's rule replaces
USAGE_ERROR_PREFIX = "FATAL Flags parsing error: "   # absl's, for bad flags found while parsing
HELP_HINT = "Pass --helpshort or --helpfull to see help on flags."


def _sentence(text):
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


# ---- checks (absl validators: a failed one is absl's one-line "FATAL Flags parsing error") ----
def _checker(problem):
    """A validator checker from `problem(value)`, which returns None when the value is fine, else what is wrong."""
    def check(value):
        message = problem(value)
        if message:
            raise flags.ValidationError(message)
        return True
    return check


def check(name, problem):
    """Registers `problem(value) -> None | what is wrong` as a validator of flag `name`."""
    flags.register_validator(name, _checker(problem))


def check_together(names, problem):
    """Registers `problem({name: value}) -> None | what is wrong` as a validator of the flags `names` together."""
    flags.register_multi_flags_validator(list(names), _checker(problem))


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(name, allow_none=False, what="a positive integer"):
    check(name, lambda value: None if (value is None and allow_none) or (_is_int(value) and value >= 1)
          else f"must be {what}" + (" (or unset)" if allow_none else ""))


def check_non_negative(name, allow_none=False, what="an integer >= 0"):
    check(name, lambda value: None if (value is None and allow_none) or (_is_int(value) and value >= 0)
          else f"must be {what}" + (" (or unset)" if allow_none else ""))


def check_positive_float(name, allow_none=False):
    check(name, lambda value: None if (value is None and allow_none) or (value is not None and value > 0)
          else "must be a positive number" + (" (or unset)" if allow_none else ""))


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def positive_numbers_problem(values, what="learning rates"):
    numbers = [_float(x) for x in values]
    if not numbers or any(x is None or not x > 0 or x == float("inf") for x in numbers):
        return f"must be a comma-separated list of positive numbers ({what})"
    return None


def positive_ints(values):
    """`values` (strings) as positive ints, None when any is not one."""
    try:
        numbers = [int(x) for x in values]
    except (TypeError, ValueError):
        return None
    return numbers if all(x >= 1 for x in numbers) else None


def one_of_problem(values, allowed, what="each"):
    unknown = [value for value in values if value not in allowed]
    return f"{what} must be one of {', '.join(allowed)} (unknown: {', '.join(unknown)})" if unknown else None


def writable_directory_problem(path):
    """None when `path` is a writable directory or can be created as one, else why not. Creates nothing: the
    nearest existing directory on the path is probed with a temporary file that is gone at once."""
    path = os.path.abspath(os.path.expanduser(path))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"{existing} is not writable ({error.strerror or error})"
    return None


def phi_file_problem(path):
    """None when `path` is a φ file that `l2l_tf.load_phi` loads, else why not."""
    if path is None:
        return None
    if not os.path.exists(path):
        return f"no such file: {path}"
    try:
        load_phi(path)
    except Exception as error:  # noqa: BLE001 - whatever stops it loading is the user's problem to see, in one line
        text = " ".join(str(error).split())
        return f"cannot load it as a φ file (l2l_tf.load_phi: {text[:300]})"
    return None


# ---- definitions ----
def define_run_flags(*, logdir, seed=0):
    """--logdir (the binary's output directory; checked writable), --seed, --restart, --checkpoint_every."""
    flags.DEFINE_string("logdir", logdir, "Output directory (results.json, figure.png, events, checkpoint). A run "
                        "whose checkpoint is there resumes from it (see --restart).")
    flags.DEFINE_integer("seed", seed, "Seed of φ's initialisation and of every problem split.")
    flags.DEFINE_bool("restart", False, "Start meta-training fresh, ignoring (then overwriting) the checkpoint in "
                      "--logdir; without it a run resumes from its checkpoint, and a checkpoint of another "
                      "configuration is an error.")
    flags.DEFINE_integer("checkpoint_every", None, "Also checkpoint every this many epochs (default: at every "
                         "validation only); a killed run loses at most this many epochs.")
    check("logdir", writable_directory_problem)
    check_positive("checkpoint_every", allow_none=True)


def define_lstm_flags(*, hidden1=20, hidden2=20, preprocess="paper"):
    """The LSTM's size and its gradient preprocessing: --hidden1, --hidden2, --preprocess."""
    flags.DEFINE_integer("hidden1", hidden1, "Units of the first LSTM layer.")
    flags.DEFINE_integer("hidden2", hidden2, "Units of the second LSTM layer.")
    flags.DEFINE_enum("preprocess", preprocess, list(preprocessing.MODES), _sentence(preprocessing.HELP))
    check_positive("hidden1")
    check_positive("hidden2")


def define_implementation_flag(default="auto"):
    """--implementation: how the rule's step runs (a run-time choice, never part of the rule or of φ files)."""
    flags.DEFINE_enum("implementation", default, list(ops.IMPLEMENTATIONS),
                      "LSTM step implementation: auto (the fused op where it is built and can run, else pure "
                      "TensorFlow), fused (the compiled op; an error without it) or reference (pure TensorFlow).")


def define_rule_flags(*, hidden1=20, hidden2=20, preprocess="paper", output_scale=0.1, implementation="auto"):
    """The LSTM rule of `rule_from_flags` (--hidden1, --hidden2, --preprocess, --output_scale) and --implementation."""
    define_lstm_flags(hidden1=hidden1, hidden2=hidden2, preprocess=preprocess)
    flags.DEFINE_float("output_scale", output_scale,
                       "Output scale of the LSTM (paper: 0.1 on MNIST, 1.0 on quadratics; release: 0.01).")
    define_implementation_flag(implementation)


def define_meta_training_flags(*, num_epochs, learning_rate, second_derivatives, validation_every,
                               num_validation_problems, num_steps=100, unroll_length=20, clip_norm=None,
                               patience=None, num_epochs_help="0: evaluate --phi without meta-training.",
                               unroll_divides_steps=True):
    """Truncated-BPTT meta-training: --num_epochs, --num_steps, --unroll_length, --learning_rate, --clip_norm,
    --second_derivatives, --validation_every, --num_validation_problems, --patience, --matmul_precision.
    `num_epochs_help` adds the binary's own meaning of --num_epochs. `unroll_divides_steps`: check that --unroll_length divides --num_steps
    when parsing (binaries with curricula check each phase's unroll length when they parse --phase instead)."""
    flags.DEFINE_integer("num_epochs", num_epochs,
                         "Meta-training epochs (one fresh problem each)" + (f"; {num_epochs_help}" if num_epochs_help
                                                                             else "."))
    flags.DEFINE_integer("num_steps", num_steps, "Optimizee steps per problem, T, in meta-training (and in "
                         "evaluation where the binary has no settings of its own).")
    flags.DEFINE_integer("unroll_length", unroll_length, "Truncated-BPTT unroll length, K (divides --num_steps).")
    flags.DEFINE_float("learning_rate", learning_rate, "Adam learning rate on φ.")
    flags.DEFINE_float("clip_norm", clip_norm, "Clip the meta-gradient to this global norm.")
    flags.DEFINE_bool("second_derivatives", second_derivatives, "Backpropagate through the optimizee gradient.")
    flags.DEFINE_integer("validation_every", validation_every, "Validate (and checkpoint) every this many epochs.")
    flags.DEFINE_integer("num_validation_problems", num_validation_problems,
                         "Held-out problems for early stopping and baseline tuning.")
    flags.DEFINE_integer("patience", patience, "Stop after this many validations without improvement.")
    flags.DEFINE_enum("matmul_precision", "float32", list(ops.MATMUL_PRECISIONS),
                      "Precision of the LSTM's GEMMs in meta-training unrolls: float32, or bfloat16 (inputs rounded to "
                      "bfloat16, float32 sums: the fused CPU op's AVX512_BF16 dot products, about 1.3x faster runs; "
                      "validation and evaluation stay float32). A run-time choice: not part of a checkpoint.")
    check_non_negative("num_epochs", what="an integer >= 0 (0: evaluate --phi without meta-training)")
    for name in ("num_steps", "unroll_length", "validation_every", "num_validation_problems"):
        check_positive(name)
    check_positive_float("learning_rate")
    check_positive_float("clip_norm", allow_none=True)
    check_non_negative("patience", allow_none=True)
    if unroll_divides_steps:
        flags.register_multi_flags_validator(
            ["unroll_length", "num_steps"], _checker(lambda values: _unroll_problem(values["unroll_length"],
                                                                                    values["num_steps"])))


def _unroll_problem(unroll_length, num_steps):
    if not (_is_int(unroll_length) and _is_int(num_steps) and unroll_length >= 1 and num_steps >= 1):
        return None  # their own checks say what is wrong
    if num_steps % unroll_length:
        return (f"--unroll_length={unroll_length} must divide --num_steps={num_steps} (each problem's steps are run "
                "in unrolls of that length)")
    return None


def define_phi_flag():
    """--phi, the starting φ, with the same meaning in every binary: meta-training starts from it, and with
    --num_epochs=0 it is evaluated as it is. Checked when parsed: the file loads (l2l_tf.load_phi), and
    --num_epochs=0 needs it. Call after `define_meta_training_flags`."""
    flags.DEFINE_string("phi", None, "The starting φ: a φ file (save_phi format, e.g. l2l_tf/pretrained/*.npz) that "
                        "meta-training starts from, or that --num_epochs=0 evaluates as it is. Its rule replaces the "
                        "rule flags (--hidden1, --hidden2, --preprocess, --output_scale).")
    check("phi", phi_file_problem)
    flags.register_multi_flags_validator(
        ["num_epochs", "phi"],
        _checker(lambda values: "--num_epochs=0 evaluates --phi without meta-training: pass --phi=FILE, or "
                                "--num_epochs > 0" if values["num_epochs"] == 0 and not values["phi"] else None))


def define_curriculum_flags(*, meta_lr_decay="none", loss_weights="uniform", meta_loss="sum"):
    """Curricula of meta-training phases (l2l_tf.training.curriculum): --phase (repeated) and the defaults of a
    phase's keys that are not flags of `define_meta_training_flags`: --meta_lr_decay, --loss_weights, --meta_loss.
    Needs `define_meta_training_flags` (--unroll_length, --num_epochs, --learning_rate, --num_steps). The phases
    are checked when `phases_from_flags` parses them (first thing in main)."""
    flags.DEFINE_multi_string(
        "phase", None,
        f"A meta-training phase, KEY=VALUE[,KEY=VALUE...] with keys {', '.join(curriculum.KEYS)} (missing keys take "
        "the flags of those names; epochs: --num_epochs). Repeat the flag for a curriculum: the phases run in order, "
        "each starting from the best φ of the one before. Without it: one phase from the flags. --num_epochs=0 "
        "always means: evaluate --phi only. (Phases on the command line add to those of a --flagfile.)")
    flags.DEFINE_enum("meta_lr_decay", meta_lr_decay, list(curriculum.META_LR_DECAYS),
                      "Schedule of the meta learning rate: constant, or cosine decay to a tenth of --learning_rate "
                      "over the phase's meta-updates.")
    flags.DEFINE_enum("loss_weights", loss_weights, list(curriculum.LOSS_WEIGHTS),
                      "Meta-loss weights w_t: uniform (paper: w_t = 1) or rising (w_t = max(1, t/10), so that the "
                      "late, small losses count as much as the early ones); validation uses the same weights.")
    flags.DEFINE_enum("meta_loss", meta_loss, list(META_LOSSES),
                      "Per-step meta-objective: sum (paper: Σ w_t f(θ_t)) or log (Σ w_t log f(θ_t)).")


def define_evaluation_flags(*, num_test_problems, lr_grid, baselines=DEFAULT_BASELINES):
    """The comparison on held-out problems: --num_test_problems, --baselines, --lr_grid (learning rates as strings
    or numbers). Checked when parsed: a positive count, known baselines, positive learning rates. (Binaries that
    log update histograms add `define_histogram_flag`.)"""
    flags.DEFINE_integer("num_test_problems", num_test_problems, "Held-out problems for the reported curves.")
    flags.DEFINE_list("baselines", list(baselines),
                      f"Baselines to tune and compare (any of {', '.join(BASELINES)}).")
    flags.DEFINE_list("lr_grid", [str(x) for x in lr_grid], "Learning rates tried per baseline.")
    check_positive("num_test_problems")
    check("baselines", lambda names: one_of_problem(names, list(BASELINES)))
    check("lr_grid", positive_numbers_problem)


def define_histogram_flag(default=1):
    """--histogram_problems: test problems whose per-step gradients and updates of the learned rule go to
    TensorBoard histograms, per setting (`log_evaluation`)."""
    flags.DEFINE_integer("histogram_problems", default, "Test problems whose per-step gradients and updates of the "
                         "learned rule go to TensorBoard histograms, per setting.")
    check_non_negative("histogram_problems")


def define_image_problem_flags(*, examples_per_problem, examples_help, data_seed_help):
    """The flags of binaries whose problems are Keras models on an image data set: --data_dir (TFDS),
    --data_seed, --examples_per_problem (0: the whole split), --batch_size (the optimizee's minibatch)."""
    flags.DEFINE_string("data_dir", None, "TFDS data_dir (default ~/tensorflow_datasets).")
    flags.DEFINE_integer("data_seed", 0, data_seed_help)
    flags.DEFINE_integer("examples_per_problem", examples_per_problem, examples_help)
    flags.DEFINE_integer("batch_size", 128, "Minibatch size of the optimizee.")
    check_positive("batch_size")
    check_non_negative("examples_per_problem", allow_none=True, what="an integer >= 0 (0: the whole split)")


def define_output_init_gain_flag():
    """--output_init_gain: multiplies the initial output-layer weights of a fresh φ."""
    flags.DEFINE_float("output_init_gain", 1.0, "Multiplies the initial output-layer weights of a fresh φ.")
    check_positive_float("output_init_gain")


def define_export_flag(what, example):
    """--export: also copy the trained φ (`what`) to this path; its directory must be writable."""
    flags.DEFINE_string("export", None, f"Also copy {what} to this path (e.g. {example}).")
    check("export", lambda path: None if path is None else writable_directory_problem(
        os.path.dirname(os.path.abspath(path))))


# ---- running a binary ----
def usage_error(message, exitcode=1):
    """Writes `message` as absl writes a bad flag's (one line, then where help is) and exits with `exitcode`."""
    sys.stdout.flush()
    sys.stderr.write(USAGE_ERROR_PREFIX + " ".join(str(message).split()) + "\n" + HELP_HINT + "\n")
    sys.stderr.flush()
    sys.exit(exitcode)


FLAGFILE_FLAGS = ("--flagfile", "-flagfile")


def find_flagfile(name, binary):
    """The path of flagfile `name`: as given when it exists (relative to the working directory), else, for a
    relative name, the file of that name next to `binary` (`--flagfile=cifar.cfg` run from the repository root finds
    experiments/cifar.cfg). ValueError naming every place looked in when there is none."""
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        return name
    if os.path.isabs(path):
        raise ValueError(f"--flagfile={name}: no such file")
    beside = os.path.join(os.path.dirname(os.path.abspath(binary)), path)
    if os.path.isfile(beside):
        return beside
    raise ValueError(f"--flagfile={name}: no such file in the working directory ({os.path.abspath(path)}) nor next "
                     f"to the binary ({beside})")


def resolve_flagfiles(argv):
    """`argv` with each --flagfile (the `--flagfile=NAME` and `--flagfile NAME` forms, also with one dash) replaced by
    the path `find_flagfile` gives for it, the binary being argv[0]; arguments after a bare "--" are left alone.
    ValueError (naming where it looked) for a flagfile that is nowhere. Flagfiles named inside flagfiles are read by
    absl, relative to the working directory."""
    argv = list(argv)
    binary = argv[0] if argv else sys.argv[0]
    index = 1
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            break
        name, equals, value = arg.partition("=")
        if name in FLAGFILE_FLAGS:
            if equals:
                argv[index] = f"{name}={find_flagfile(value, binary)}"
            elif index + 1 < len(argv):
                argv[index + 1] = find_flagfile(argv[index + 1], binary)
                index += 1
        index += 1
    return argv


def run(main, argv=None):
    """`app.run(main)`, an app.UsageError raised by main reported like a bad flag (one line and where help is,
    exit status 1) instead of after the whole --helpshort (what app.run does). A --flagfile that is not in the working
    directory is looked for next to the binary (`resolve_flagfiles`); one that is in neither place is the same
    one-line usage error, naming both places."""
    def checked_main(args):
        try:
            return main(args)
        except app.UsageError as error:
            usage_error(error, error.exitcode or 1)

    try:
        argv = resolve_flagfiles(sys.argv if argv is None else argv)
    except ValueError as error:
        usage_error(error)
    app.run(checked_main, argv=argv)


# ---- values from the flags ----
def rule_from_flags():
    """The LSTMUpdateRule of --hidden1, --hidden2, --preprocess, --output_scale (app.UsageError when invalid)."""
    try:
        return LSTMUpdateRule(FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess, output_scale=FLAGS.output_scale)
    except ValueError as error:
        raise app.UsageError(f"bad LSTM rule flags: {error}") from error


def starting_point():
    """(rule, φ) a run starts from: --phi's rule and φ tree, or the rule of the flags and None (a fresh φ, the
    binary's own initialisation)."""
    if not FLAGS.phi:
        return rule_from_flags(), None
    try:
        rule, phi, _ = load_phi(FLAGS.phi)
    except (OSError, ValueError) as error:  # checked when parsed; the file may have gone since
        raise app.UsageError(f"--phi={FLAGS.phi}: {error}") from error
    ignored = [f"--{name}" for name in RULE_FLAGS if name in FLAGS and FLAGS[name].present
               and getattr(rule, name, FLAGS[name].value) != FLAGS[name].value]
    if ignored:
        logging.warning("--phi=%s: its rule (%s) replaces %s", FLAGS.phi, rule, ", ".join(ignored))
    return rule, phi


def phi_digest():
    """SHA-256 of the --phi file (None without one): what identifies the starting φ in a run's fingerprint."""
    if not FLAGS.phi:
        return None
    with open(FLAGS.phi, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_implementation(rule):
    """--implementation, checked for `rule` up front (app.UsageError, e.g. "fused" without the compiled op)."""
    try:
        return rule.check_implementation(FLAGS.implementation)
    except (ValueError, RuntimeError) as error:
        raise app.UsageError(f"--implementation={FLAGS.implementation}: {error}") from error


def lr_grid():
    """--lr_grid as floats."""
    return [float(x) for x in FLAGS.lr_grid]


def phase_defaults():
    """The Phase of the flags alone (what --phase keys default to; epochs: --num_epochs)."""
    return curriculum.Phase(unroll_length=FLAGS.unroll_length, epochs=FLAGS.num_epochs,
                            learning_rate=FLAGS.learning_rate, meta_lr_decay=FLAGS.meta_lr_decay,
                            meta_loss=FLAGS.meta_loss, loss_weights=FLAGS.loss_weights)


def phases_from_flags():
    """The curriculum of --phase (one phase from the flags without it) as `curriculum.Phase`s for --num_steps;
    app.UsageError naming the bad phase and key."""
    try:
        return curriculum.parse_phases(FLAGS.phase, phase_defaults(), FLAGS.num_steps)
    except ValueError as error:  # "phase 'SPEC': what is wrong"
        raise app.UsageError(f"--{error}") from error


def flag_values():
    """{name: value} of the binary's own flags and the shared ones (its key flags: what --helpshort lists), sorted
    by name: what results.json and TensorBoard record as the run's flags."""
    names = {flag.name for flag in FLAGS.get_key_flags_for_module(sys.argv[0])}
    if not names:  # imported rather than run (tests): this module's flags and those of the binary's module
        names = {flag.name for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__])}
    return {name: FLAGS[name].value for name in sorted(names)}


# ---- meta-training and what a run records ----
def run_config(**values):
    """The `run_config` of a binary's MetaTrainer: what defines its run beyond what the trainer knows (the trainer
    adds rule, families, seed, meta-loss, steps, unroll length, meta learning rate, ...): the starting φ file's
    digest and the binary's `values` (data, curriculum position, ...). A checkpoint resumes only with the same."""
    return {"init_phi_sha256": phi_digest(), **values}


def meta_train(trainer, num_epochs, *, checkpoint_dir, logdir):
    """`trainer.train` with the shared flags (--validation_every, --num_validation_problems, --checkpoint_every,
    --patience, --restart). Resumes from `checkpoint_dir` (the trainer says so); a checkpoint that cannot be resumed
    (another configuration, unreadable) is a usage error that names it and says to pass --restart."""
    try:
        return trainer.train(num_epochs, validation_every=FLAGS.validation_every,
                             num_validation_problems=FLAGS.num_validation_problems, checkpoint_dir=checkpoint_dir,
                             checkpoint_every=FLAGS.checkpoint_every, logdir=logdir, patience=FLAGS.patience,
                             restart=FLAGS.restart)
    except CheckpointError as error:
        raise app.UsageError(str(error).replace("restart=True (binaries: --restart)", "--restart")) from error


def run_summary(rule, trainers=()):
    """The results.json keys every binary writes: the rule (`rule_to_config`), seed, implementation, the flags,
    and per meta-training phase (one per trainer, none with --num_epochs=0) the validation history [[epoch, loss],
    ...] and the epoch it resumed from (null: started fresh)."""
    return {"rule": rule_to_config(rule), "seed": FLAGS.seed, "implementation": FLAGS.implementation,
            "flags": flag_values(),
            "validation_history": [[[int(epoch), float(loss)] for epoch, loss in trainer.history]
                                   for trainer in trainers],
            "resumed_from": [trainer.resumed_from for trainer in trainers]}


def log_evaluation(name, results, rule, phi, test_family, steps, writer, histogram_writer):
    """TensorBoard of one evaluated setting: every optimizer's mean curve and the tuning scores under `name/`, and
    (--histogram_problems) the learned rule's update and gradient histograms on test problems."""
    from l2l_tf import reporting
    from l2l_tf.problems import seeds_for

    reporting.log_curves(writer, results, prefix=f"{name}/")
    reporting.log_tuning(writer, results, prefix=f"{name}/")
    if FLAGS.histogram_problems > 0:
        log_update_histograms(histogram_writer, rule, phi, test_family,
                              seeds_for("test", FLAGS.histogram_problems, FLAGS.seed), steps, f"{name}/",
                              implementation=FLAGS.implementation)


def log_update_histograms(writer, rule, phi, family, seeds, num_steps, prefix, implementation="auto"):
    """TensorBoard histograms of a learned rule's updates (and of the gradients) of each parameter tensor at each step,
    and the loss, on the problems of `family` drawn from `seeds` (`{prefix}problem{i}/...`)."""
    import tensorflow as tf

    from l2l_tf.training import summaries

    names = [spec.name.replace("/", "_") for spec in family.param_specs()]
    with writer.as_default():
        for index, seed in enumerate(seeds):
            losses, gradients, updates = summaries.trajectory(family, rule, phi, family.sample(seed), num_steps,
                                                              implementation)
            for t, (loss, grads, steps) in enumerate(zip(losses, gradients, updates)):
                for name, grad, update in zip(names, grads, steps):
                    tf.summary.histogram(f"{prefix}problem{index}/updates/{name}", update, step=t)
                    tf.summary.histogram(f"{prefix}problem{index}/gradients/{name}", grad, step=t)
                tf.summary.scalar(f"{prefix}problem{index}/loss", loss, step=t)
    writer.flush()
