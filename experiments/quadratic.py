"""The quadratic experiment (paper Fig. 4, left): f(θ) = ‖Wθ − y‖² on random 10-d problems.

Meta-trains the LSTM optimizer (from a fresh φ, or from --phi), tunes SGD/NAG/RMSprop/Adam learning rates on
validation problems, runs everything on the same held-out test problems and writes DIR/{results.json, figure.png,
phi.npz, train/ and test/ (TensorBoard), checkpoint/}. A run resumes from its checkpoint (it says from which epoch);
--restart starts it fresh. --num_epochs=0 --phi=FILE evaluates FILE's φ without meta-training.

    python experiments/quadratic.py --flagfile=experiments/quadratic.cfg --logdir=/tmp/quadratic
    python experiments/quadratic.py --flagfile=experiments/quadratic.cfg --logdir=/tmp/shipped \\
        --phi=l2l_tf/pretrained/quadratic.npz --num_epochs=0
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up notes would bury a usage error

from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import tensorflow as tf  # noqa: E402

from experiments import common_flags as common  # noqa: E402
from l2l_tf import baselines, evaluation, reporting  # noqa: E402
from l2l_tf.problems import QuadraticFamily, seeds_for  # noqa: E402
from l2l_tf.training import MetaTrainer  # noqa: E402

FLAGS = flags.FLAGS
common.define_run_flags(logdir="/tmp/l2l_quadratic")
flags.DEFINE_enum("distribution", "gaussian", ["gaussian", "uniform"], "W, y ~ N(0, 1) (paper) or U[0, 1) (release).")
flags.DEFINE_integer("batch_size", 128, "Quadratic functions per problem.")
flags.DEFINE_integer("num_dims", 10, "Dimension of each quadratic.")
common.check_positive("batch_size")
common.check_positive("num_dims")
common.define_rule_flags(preprocess="none", output_scale=1.0)
common.define_meta_training_flags(num_epochs=4000, learning_rate=1e-2, second_derivatives=True,
                                  validation_every=250, num_validation_problems=20)
common.define_phi_flag()
common.define_evaluation_flags(num_test_problems=100, lr_grid=[f"{10 ** (k / 4):.4g}" for k in range(-16, 5)])
flags.adopt_module_key_flags(common)  # the shared flags show in --helpshort too


def main(argv):
    del argv
    started = time.time()
    logdir = FLAGS.logdir
    rule, phi = common.starting_point()
    common.check_implementation(rule)
    family = QuadraticFamily(FLAGS.batch_size, FLAGS.num_dims, FLAGS.distribution)
    writer = tf.summary.create_file_writer(os.path.join(logdir, "test"))
    reporting.log_flags(writer, common.flag_values())
    trainers = []
    if FLAGS.num_epochs > 0:
        trainer = MetaTrainer(rule, family, num_steps=FLAGS.num_steps, unroll_length=FLAGS.unroll_length,
                              second_derivatives=FLAGS.second_derivatives, learning_rate=FLAGS.learning_rate,
                              clip_norm=FLAGS.clip_norm, seed=FLAGS.seed, implementation=FLAGS.implementation,
                              matmul_precision=FLAGS.matmul_precision,
                              phi=phi, run_config=common.run_config(experiment="quadratic"))
        phi = common.meta_train(trainer, FLAGS.num_epochs, checkpoint_dir=os.path.join(logdir, "checkpoint"),
                                logdir=os.path.join(logdir, "train"))
        trainers.append(trainer)
        trainer.export(os.path.join(logdir, "phi.npz"), experiment="quadratic", distribution=FLAGS.distribution,
                       init_phi=FLAGS.phi)
        print(f"meta-training: {trainer.epoch} epochs, best validation {trainer.best_validation:.4g}, "
              f"{trainer.skipped_steps} skipped meta-steps, {time.time() - started:.0f} s")
    else:
        print(f"evaluating the φ of {FLAGS.phi} (no meta-training: --num_epochs=0)")

    evaluator = evaluation.Evaluator(family, FLAGS.num_steps)
    results = evaluation.compare(
        evaluator, baselines.learned(rule, implementation=FLAGS.implementation), phi,
        validation_seeds=seeds_for("validation", FLAGS.num_validation_problems, FLAGS.seed),
        test_seeds=seeds_for("test", FLAGS.num_test_problems, FLAGS.seed),
        baselines=FLAGS.baselines, grid=common.lr_grid())
    reporting.log_curves(writer, results)
    reporting.log_tuning(writer, results)
    output = {"steps": FLAGS.num_steps, "num_test_problems": FLAGS.num_test_problems,
              "optimizers": reporting.public(results), "tuning": reporting.tuning_table(results),
              **common.run_summary(rule, trainers)}
    reporting.write_json(os.path.join(logdir, "results.json"), output)
    figure = os.path.join(logdir, "figure.png")
    reporting.plot_curves(figure, [(reporting.quadratic_title(FLAGS.num_dims, FLAGS.distribution), results)])
    reporting.log_figure(writer, figure)
    print(f"{'optimizer':<10}{'lr':>10}{'final loss (mean ± std)':>28}")
    for name, summary in reporting.public(results).items():
        lr = "-" if summary["learning_rate"] is None else f"{summary['learning_rate']:.3g}"
        print(f"{name:<10}{lr:>10}{summary['final_loss_mean']:>16.4g} ± {summary['final_loss_std']:.3g}")
    print(f"wrote {logdir}/results.json and figure.png in {time.time() - started:.0f} s")


if __name__ == "__main__":
    common.run(main)
