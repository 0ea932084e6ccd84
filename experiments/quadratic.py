"""The quadratic experiment (paper Fig. 4, left): f(θ) = ‖Wθ − y‖² on random 10-d problems.

Meta-trains the LSTM optimizer, tunes SGD/NAG/RMSprop/Adam learning rates on validation problems, runs everything
on the same held-out test problems and writes DIR/{results.json, figure.png, phi.npz, events.*, checkpoint/}.

    python experiments/quadratic.py --flagfile=experiments/quadratic.cfg --logdir=/tmp/quadratic
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from l2l_tf import baselines, evaluation, reporting  # noqa: E402
from l2l_tf.meta_train import MetaTrainer  # noqa: E402
from l2l_tf.problems import QuadraticFamily, seeds_for  # noqa: E402
from l2l_tf.update_rule import LSTMUpdateRule  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("logdir", "/tmp/l2l_quadratic", "Output directory (results.json, figure.png, events, checkpoint).")
flags.DEFINE_integer("seed", 0, "Seed of φ's initialisation and of every problem split.")
flags.DEFINE_enum("distribution", "gaussian", ["gaussian", "uniform"], "W, y ~ N(0, 1) (paper) or U[0, 1) (release).")
flags.DEFINE_integer("batch_size", 128, "Quadratic functions per problem.")
flags.DEFINE_integer("num_dims", 10, "Dimension of each quadratic.")
flags.DEFINE_integer("hidden1", 20, "Units of the first LSTM layer.")
flags.DEFINE_integer("hidden2", 20, "Units of the second LSTM layer.")
flags.DEFINE_enum("preprocess", "none", ["none", "paper", "clamped"], "Gradient preprocessing.")
flags.DEFINE_float("output_scale", 1.0, "Output scale of the LSTM.")
flags.DEFINE_enum("implementation", "auto", ["auto", "fused", "reference"], "LSTM step implementation.")
flags.DEFINE_integer("num_epochs", 4000, "Meta-training epochs (one fresh problem each).")
flags.DEFINE_integer("num_steps", 100, "Optimizee steps per problem, T.")
flags.DEFINE_integer("unroll_length", 20, "Truncated-BPTT unroll length, K.")
flags.DEFINE_float("learning_rate", 1e-2, "Adam learning rate on φ.")
flags.DEFINE_float("clip_norm", None, "Clip the meta-gradient to this global norm.")
flags.DEFINE_bool("second_derivatives", True, "Backpropagate through the optimizee gradient.")
flags.DEFINE_integer("validation_every", 250, "Validate (and checkpoint) every this many epochs.")
flags.DEFINE_integer("num_validation_problems", 20, "Held-out problems for early stopping and baseline tuning.")
flags.DEFINE_integer("num_test_problems", 100, "Held-out problems for the reported curves.")
flags.DEFINE_integer("patience", None, "Stop after this many validations without improvement.")
flags.DEFINE_list("baselines", ["sgd", "nag", "rmsprop", "adam"], "Baselines to tune and compare.")
flags.DEFINE_list("lr_grid", [f"{10 ** (k / 4):.4g}" for k in range(-16, 5)], "Learning rates tried per baseline.")


def main(argv):
    del argv
    started = time.time()
    logdir = FLAGS.logdir
    rule = LSTMUpdateRule(FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess, output_scale=FLAGS.output_scale,
                          implementation=FLAGS.implementation)
    family = QuadraticFamily(FLAGS.batch_size, FLAGS.num_dims, FLAGS.distribution)
    trainer = MetaTrainer(rule, family, num_steps=FLAGS.num_steps, unroll_length=FLAGS.unroll_length,
                          second_derivatives=FLAGS.second_derivatives, learning_rate=FLAGS.learning_rate,
                          clip_norm=FLAGS.clip_norm, seed=FLAGS.seed)
    phi = trainer.train(FLAGS.num_epochs, validation_every=FLAGS.validation_every,
                        num_validation_problems=FLAGS.num_validation_problems,
                        checkpoint_dir=os.path.join(logdir, "checkpoint"), logdir=os.path.join(logdir, "train"),
                        patience=FLAGS.patience)
    trainer.export(os.path.join(logdir, "phi.npz"), experiment="quadratic", distribution=FLAGS.distribution)
    print(f"meta-training: {trainer.epoch} epochs, best validation {trainer.best_validation:.4g}, "
          f"{trainer.skipped_steps} skipped meta-steps, {time.time() - started:.0f} s")

    evaluator = evaluation.Evaluator(family, FLAGS.num_steps)
    results = evaluation.compare(
        evaluator, baselines.learned(rule), phi,
        validation_seeds=seeds_for("validation", FLAGS.num_validation_problems, FLAGS.seed),
        test_seeds=seeds_for("test", FLAGS.num_test_problems, FLAGS.seed),
        baselines=FLAGS.baselines, grid=[float(x) for x in FLAGS.lr_grid])
    reporting.log_curves(tf.summary.create_file_writer(os.path.join(logdir, "test")), results)
    output = {"steps": FLAGS.num_steps, "num_test_problems": FLAGS.num_test_problems,
              "optimizers": reporting.public(results)}
    reporting.write_json(os.path.join(logdir, "results.json"), output)
    reporting.plot_curves(os.path.join(logdir, "figure.png"),
                          [(f"Quadratics ({FLAGS.num_dims}-d, {FLAGS.distribution})", results)])
    print(f"{'optimizer':<10}{'lr':>10}{'final loss (mean ± std)':>28}")
    for name, summary in reporting.public(results).items():
        lr = "-" if summary["learning_rate"] is None else f"{summary['learning_rate']:.3g}"
        print(f"{name:<10}{lr:>10}{summary['final_loss_mean']:>16.4g} ± {summary['final_loss_std']:.3g}")
    print(f"wrote {logdir}/results.json and figure.png in {time.time() - started:.0f} s")


if __name__ == "__main__":
    app.run(main)
