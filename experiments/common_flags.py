"""The flags the experiment binaries share, each defined here once, with each binary's defaults as arguments.

    from experiments import common_flags as common
    common.define_run_flags(logdir="/tmp/l2l_mnist")
    common.define_rule_flags(preprocess="paper", output_scale=0.1)
    common.define_meta_training_flags(num_epochs=1000, learning_rate=1e-3, second_derivatives=False,
                                      validation_every=50, num_validation_problems=10)
    common.define_curriculum_flags()
    common.define_evaluation_flags(num_test_problems=50, lr_grid=[...])
    ...
    rule = common.rule_from_flags()
    phases = common.phases_from_flags()          # --phase → curriculum.Phase values (app.UsageError when bad)

A binary calls each `define_*` function at most once, at import (absl flags are global). Names, meanings and help
are the same in every binary; only the defaults differ (so each binary's README command gives what it gave before).
The choices of the enums come from the library (`l2l_tf.rules.preprocess`, `l2l_tf.ops`, `l2l_tf.training`).
"""
from absl import app, flags

from l2l_tf import ops
from l2l_tf.baselines import BASELINES
from l2l_tf.rules import LSTMUpdateRule
from l2l_tf.rules import preprocess as preprocessing
from l2l_tf.training import curriculum
from l2l_tf.training.meta_trainer import META_LOSSES

FLAGS = flags.FLAGS

DEFAULT_BASELINES = ("sgd", "nag", "rmsprop", "adam")


def _sentence(text):
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


# ---- definitions ----
def define_run_flags(*, logdir, seed=0):
    """--logdir (the binary's output directory) and --seed."""
    flags.DEFINE_string("logdir", logdir, "Output directory (results.json, figure.png, events, checkpoint).")
    flags.DEFINE_integer("seed", seed, "Seed of φ's initialisation and of every problem split.")


def define_lstm_flags(*, hidden1=20, hidden2=20, preprocess="paper"):
    """The LSTM's size and its gradient preprocessing: --hidden1, --hidden2, --preprocess."""
    flags.DEFINE_integer("hidden1", hidden1, "Units of the first LSTM layer.")
    flags.DEFINE_integer("hidden2", hidden2, "Units of the second LSTM layer.")
    flags.DEFINE_enum("preprocess", preprocess, list(preprocessing.MODES), _sentence(preprocessing.HELP))


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
                               patience=None, num_epochs_help=""):
    """Truncated-BPTT meta-training: --num_epochs, --num_steps, --unroll_length, --learning_rate, --clip_norm,
    --second_derivatives, --validation_every, --num_validation_problems, --patience. `num_epochs_help` adds the
    binary's own meaning of --num_epochs (e.g. what 0 does)."""
    flags.DEFINE_integer("num_epochs", num_epochs,
                         "Meta-training epochs (one fresh problem each)" + (f"; {num_epochs_help}" if num_epochs_help
                                                                             else "."))
    flags.DEFINE_integer("num_steps", num_steps, "Optimizee steps per problem, T, in meta-training (and in "
                         "evaluation where the binary has no settings of its own).")
    flags.DEFINE_integer("unroll_length", unroll_length, "Truncated-BPTT unroll length, K.")
    flags.DEFINE_float("learning_rate", learning_rate, "Adam learning rate on φ.")
    flags.DEFINE_float("clip_norm", clip_norm, "Clip the meta-gradient to this global norm.")
    flags.DEFINE_bool("second_derivatives", second_derivatives, "Backpropagate through the optimizee gradient.")
    flags.DEFINE_integer("validation_every", validation_every, "Validate (and checkpoint) every this many epochs.")
    flags.DEFINE_integer("num_validation_problems", num_validation_problems,
                         "Held-out problems for early stopping and baseline tuning.")
    flags.DEFINE_integer("patience", patience, "Stop after this many validations without improvement.")


def define_curriculum_flags(*, meta_lr_decay="none", loss_weights="uniform", meta_loss="sum"):
    """Curricula of meta-training phases (l2l_tf.training.curriculum): --phase (repeated) and the defaults of a
    phase's keys that are not flags of `define_meta_training_flags`: --meta_lr_decay, --loss_weights, --meta_loss.
    Needs `define_meta_training_flags` (--unroll_length, --num_epochs, --learning_rate, --num_steps)."""
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
    or numbers). Unknown baselines are rejected when the flags are parsed."""
    flags.DEFINE_integer("num_test_problems", num_test_problems, "Held-out problems for the reported curves.")
    flags.DEFINE_list("baselines", list(baselines),
                      f"Baselines to tune and compare (any of {', '.join(BASELINES)}).")
    flags.DEFINE_list("lr_grid", [str(x) for x in lr_grid], "Learning rates tried per baseline.")
    flags.register_validator("baselines", lambda names: all(name in BASELINES for name in names),
                             f"--baselines: each must be one of {', '.join(BASELINES)}")
    flags.register_validator("lr_grid", _is_float_list, "--lr_grid: learning rates must be numbers")


def _is_float_list(values):
    try:
        [float(x) for x in values]
    except (TypeError, ValueError):
        return False
    return True


# ---- values from the flags ----
def rule_from_flags():
    """The LSTMUpdateRule of --hidden1, --hidden2, --preprocess, --output_scale (app.UsageError when invalid)."""
    try:
        return LSTMUpdateRule(FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess, output_scale=FLAGS.output_scale)
    except ValueError as error:
        raise app.UsageError(f"bad LSTM rule flags: {error}") from error


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
