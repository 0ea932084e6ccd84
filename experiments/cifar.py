"""The CIFAR experiments (paper Fig. 7): learned optimizers for the paper's convnet on CIFAR-10, CIFAR-5 and CIFAR-2.

    python experiments/cifar.py --flagfile=cifar.cfg --cifar_dir=DIR --logdir=/tmp/cifar       # the full run
    python experiments/cifar.py --flagfile=cifar_smoke.cfg --cifar_dir=DIR --logdir=/tmp/smoke # the same in minutes

The optimizee is the convnet of `l2l_tf.problems.cifar` (three 5×5 conv layers of 16 channels with batch
normalisation, ReLU and max-pooling, a 32-unit fully connected layer, the logits), run for --num_steps steps on
minibatches of --batch_size images of its own subset of --examples_per_problem images, batch-norm statistics carried
from step to step. The learned optimizer is the paper's pair of coordinatewise LSTMs, one for the conv kernels and
one for every other tensor, each with its own φ (`two_lstm_rule`).

What runs, in order, each meta-training resumable from its own checkpoint under DIR/checkpoint/RUN:
  lstm            the two-LSTM rule meta-trained on CIFAR-10 train-split problems. With several --output_scales,
                  each is meta-trained for --scale_selection_epochs epochs and the one with the lowest validation
                  meta-loss (over those epochs) goes on to the whole curriculum (the others stop there); the choice
                  and every candidate's validation score are in results.json ("output_scale").
  lstm_single     (--lstm_single, CIFAR-10 only) the ablation: one LSTM for every tensor, same scale and curriculum.
  lstm_sub        (per subset setting) the two-LSTM rule meta-trained only on the other labels (CIFAR-5: labels
                  5-9, CIFAR-2: labels 2-9, as --cifar5_labels / --cifar2_labels say), its convnet having as many
                  logits as those labels: the setting's labels are never seen in its meta-training.
Then per setting (--settings: cifar10, cifar5, cifar2) every baseline's learning rate is tuned on validation-split
problems of the setting and every optimizer runs on the same test-split problems. A setting's results are written to
DIR/evaluation/SETTING.json with a fingerprint (the flags, the data and the φ that define them): a rerun reuses
them when the fingerprint matches, and evaluates the setting again otherwise.

All meta-training runs share one curriculum (--phase, or one phase from the flags), so the ablation and the
LSTM-sub get the budget of the main LSTM. Writes DIR/{results.json, figure.png (one panel per setting, log-scale loss
against step), phi.npz (the CIFAR-10 two-LSTM φ), phi_RUN.npz (the others), train/RUN (meta-training TensorBoard),
test/ (curves, tuning, flags, figure), histograms/, checkpoint/RUN/, evaluation/}. --phi starts the CIFAR-10 LSTM from
a φ file; --num_epochs=0 evaluates it alone (no ablation, no LSTM-sub: they need meta-training).

Problem sizes. Every problem of a setting trains on --examples_per_problem images, capped at the smallest split that
setting draws problems from (its validation and test splits, and the train and validation splits of its LSTM-sub),
so that train, validation and test problems are alike; results.json states the size used per setting.
"""
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up notes would bury a usage error

from absl import app, flags, logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from experiments import common_flags as common  # noqa: E402
from l2l_tf import baselines, datasets, evaluation, reporting  # noqa: E402
from l2l_tf.datasets import cifar10 as cifar10_data  # noqa: E402
from l2l_tf.problems import seeds_for  # noqa: E402
from l2l_tf.problems.cifar import cifar_families, two_lstm_rule  # noqa: E402
from l2l_tf.rules import LSTMUpdateRule, Partitioned, leaf_paths, rule_to_config  # noqa: E402
from l2l_tf.training import MetaTrainer  # noqa: E402
from l2l_tf.training.checkpoints import differences  # noqa: E402

FLAGS = flags.FLAGS
SETTINGS = ("cifar10", "cifar5", "cifar2")
TITLES = {"cifar10": "CIFAR-10", "cifar5": "CIFAR-5", "cifar2": "CIFAR-2"}
NUM_CLASSES = cifar10_data.NUM_CLASSES

common.define_run_flags(logdir="/tmp/l2l_cifar")
flags.DEFINE_enum("cifar_source", "auto", ["auto", "tfds", "directory"],
                  "Where CIFAR-10 comes from (l2l_tf.datasets.load_cifar10): tfds (tensorflow-datasets; a prepared "
                  "--data_dir or the network), directory (the CIFAR-10 python batches: --cifar_dir, else the Keras "
                  "cache) or auto (--cifar_dir when given, else TFDS, else the Keras cache).")
flags.DEFINE_string("cifar_dir", None, "A directory of CIFAR-10 python batches (data_batch_1..5, test_batch).")
flags.DEFINE_float("validation_size", 0.1, "Training images held out as the validation split: a fraction in (0, 1), "
                   "or a count (>= 1).")
common.define_image_problem_flags(
    examples_per_problem=1000, data_seed_help="Seed of the validation hold-out.",
    examples_help="Each problem trains on its own random subset of this many images of its split, capped per setting "
    "at the smallest split the setting draws problems from (0: every problem uses its whole split).")
common.define_lstm_flags(preprocess="paper")
flags.DEFINE_list("output_scales", ["0.1", "0.01"],
                  "Output scales of the LSTMs to choose from on validation (paper: 0.1; release: 0.01). With more "
                  "than one, each is meta-trained for --scale_selection_epochs epochs and the best goes on.")
flags.DEFINE_integer("scale_selection_epochs", 50, "Epochs of the first phase after which the output scale with the "
                     "lowest validation meta-loss is chosen (with several --output_scales).")
common.define_output_init_gain_flag()
common.define_implementation_flag()
common.define_meta_training_flags(num_epochs=250, learning_rate=1e-3, second_derivatives=False, validation_every=25,
                                  num_validation_problems=5, num_epochs_help="0: evaluate --phi only.",
                                  unroll_divides_steps=False)
common.define_phi_flag()
common.define_curriculum_flags()
common.define_evaluation_flags(num_test_problems=20, lr_grid=["0.0001", "0.001", "0.01", "0.1", "1"])
flags.DEFINE_list("settings", list(SETTINGS), f"Settings to evaluate: {', '.join(SETTINGS)}.")
flags.DEFINE_list("cifar5_labels", ["0", "1", "2", "3", "4"], "The 5 CIFAR-10 labels of CIFAR-5 (its LSTM-sub is "
                  "meta-trained on the other 5).")
flags.DEFINE_list("cifar2_labels", ["0", "1"], "The 2 CIFAR-10 labels of CIFAR-2 (its LSTM-sub is meta-trained on "
                  "the other 8).")
flags.DEFINE_integer("cifar5_num_test_problems", None, "Held-out problems of CIFAR-5 (default: --num_test_problems).")
flags.DEFINE_integer("cifar2_num_test_problems", None, "Held-out problems of CIFAR-2 (default: --num_test_problems). "
                     "Its small problems end near zero loss, where a rare spike of one problem moves the mean at a "
                     "step by more than the optimizers differ: more problems estimate that mean.")
flags.DEFINE_bool("lstm_single", True, "Also meta-train and report on CIFAR-10 the ablation with one LSTM for every "
                  "tensor (--nolstm_single: skip it).")
common.define_histogram_flag()
common.define_export_flag("the CIFAR-10 two-LSTM φ", "l2l_tf/pretrained/cifar10.npz")
flags.adopt_module_key_flags(common)  # the shared flags show in --helpshort too


# ---- this binary's own checks (the shared flags are checked in common_flags) ----
def _labels_problem(count):
    def problem(values):
        try:
            chosen = [int(value) for value in values]
        except (TypeError, ValueError):
            chosen = []
        if len(chosen) != count or len(set(chosen)) != count or not all(0 <= x < NUM_CLASSES for x in chosen):
            return f"must be {count} distinct CIFAR-10 labels in 0..{NUM_CLASSES - 1}"
        return None
    return problem


def _validation_size_problem(value):
    if value is not None and (0 < value < 1 or (value >= 1 and float(value).is_integer())):
        return None
    return "must be a fraction in (0, 1) or a whole number of images (>= 1)"


common.check("settings", lambda names: "must name at least one setting" if not names else
             common.one_of_problem(names, list(SETTINGS)))
common.check("cifar5_labels", _labels_problem(5))
common.check("cifar2_labels", _labels_problem(2))
common.check("output_scales", lambda values: common.positive_numbers_problem(values, "output scales"))
common.check("validation_size", _validation_size_problem)
common.check("cifar_dir", lambda path: None if path is None or os.path.isdir(os.path.expanduser(path)) else
             f"no such directory: {path}")
common.check_positive("scale_selection_epochs")
common.check_positive("cifar5_num_test_problems", allow_none=True)
common.check_positive("cifar2_num_test_problems", allow_none=True)
common.check_together(["cifar_source", "cifar_dir"], lambda values: "--cifar_dir is read with "
                      "--cifar_source=directory or auto, not tfds" if values["cifar_source"] == "tfds"
                      and values["cifar_dir"] else None)


# ---- values from the flags ----
def training_phases():
    """The meta-training phases (`curriculum.Phase`s) of --phase, or one from the flags; [] to evaluate only."""
    if FLAGS.num_epochs == 0:
        return []
    phases = common.phases_from_flags()
    if len(output_scales()) > 1 and not FLAGS.phi and FLAGS.scale_selection_epochs > phases[0].epochs:
        raise app.UsageError(f"--scale_selection_epochs={FLAGS.scale_selection_epochs} must be at most the first "
                             f"phase's {phases[0].epochs} epochs (the output scale is chosen within it)")
    return phases


def output_scales():
    return list(dict.fromkeys(float(x) for x in FLAGS.output_scales))


def setting_labels(name):
    """The CIFAR-10 labels of a setting (None: all ten)."""
    return None if name == "cifar10" else tuple(int(x) for x in getattr(FLAGS, f"{name}_labels"))


def other_labels(labels):
    return tuple(label for label in range(NUM_CLASSES) if label not in labels)


def num_test_problems(name):
    """The setting's held-out problem count: its own flag where given, else --num_test_problems."""
    own = getattr(FLAGS, f"{name}_num_test_problems", None) if name != "cifar10" else None
    return own if own is not None else FLAGS.num_test_problems


def validation_size():
    return float(FLAGS.validation_size) if FLAGS.validation_size < 1 else int(FLAGS.validation_size)


def load_data():
    try:
        return datasets.load_cifar10(source=FLAGS.cifar_source, directory=FLAGS.cifar_dir, data_dir=FLAGS.data_dir,
                                     validation_size=validation_size(), seed=FLAGS.data_seed)
    except datasets.Cifar10UnavailableError as error:
        raise app.UsageError(str(error)) from error
    except ValueError as error:  # an unreadable batch file, a hold-out larger than the training images
        raise app.UsageError(f"CIFAR-10: {error}") from error


def subset(splits, labels, names=("train", "validation", "test")):
    """The splits `names` restricted to `labels`, remapped to 0..k-1 (all of them for labels=None)."""
    return {name: cifar10_data.filter_labels(*splits[name], labels) for name in names}


def examples_per_problem(*subsets):
    """--examples_per_problem capped at the smallest split of `subsets` (None: whole splits)."""
    if not FLAGS.examples_per_problem:
        return None
    sizes = [len(y) for splits in subsets for _, y in splits.values()]
    if min(sizes) < 1:
        raise app.UsageError("a split of the requested labels holds no images (see --validation_size and the data)")
    return min([FLAGS.examples_per_problem] + sizes)


def fresh_phi(rule):
    """A fresh φ for `rule` from --seed, the output layer's weights ×--output_init_gain (Partitioned: group i from
    seed + i, as `Partitioned.init_phi`)."""
    gain = FLAGS.output_init_gain
    if isinstance(rule, Partitioned):
        return {group: sub.init_phi(FLAGS.seed + i, output_gain=gain) for i, (group, sub) in
                enumerate(rule.rules.items())}
    return rule.init_phi(FLAGS.seed, output_gain=gain)


def output_scale_of(rule):
    """The output scale of an LSTM rule or of a Partitioned rule of LSTMs (None when they differ or it has none)."""
    if isinstance(rule, Partitioned):
        scales = {output_scale_of(sub) for sub in rule.rules.values()}
        return scales.pop() if len(scales) == 1 else None
    return getattr(rule, "output_scale", None)


def phi_sha256(phi):
    """A digest of a φ tree's leaf paths, shapes and float32 values."""
    digest = hashlib.sha256()
    for path, leaf in leaf_paths(phi):
        array = np.ascontiguousarray(np.asarray(leaf, np.float32))
        digest.update(f"{path}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# ---- meta-training ----
class Runs:
    """The meta-training runs of this invocation: their trainers (one per phase) and what results.json says of them."""

    def __init__(self, phases):
        self.phases = phases
        self.trainers = []   # every phase trainer of every run, in the order they ran (run_summary)
        self.summary = {}    # run name → what results.json records of it

    def directories(self, run_dir, index):
        suffix = "" if len(self.phases) == 1 else f"/phase{index + 1}"
        return (os.path.join(FLAGS.logdir, "checkpoint", run_dir + suffix),
                os.path.join(FLAGS.logdir, "train", run_dir + suffix))

    def trainer(self, rule, phi, families, index, values, from_phi):
        phase = self.phases[index]
        run_config = common.run_config(experiment="cifar", phase=index,
                                       previous_phases=[p.as_dict() for p in self.phases[:index]], **values)
        if not from_phi:
            run_config["init_phi_sha256"] = None
        steps = FLAGS.num_steps
        return MetaTrainer(rule, families["train"], num_steps=steps, unroll_length=phase.unroll_length,
                           loss_weights=phase.weights(steps), meta_loss=phase.meta_loss,
                           second_derivatives=FLAGS.second_derivatives,
                           learning_rate=phase.learning_rate_schedule(steps), clip_norm=FLAGS.clip_norm,
                           seed=FLAGS.seed, phi=phi, validation_family=families["validation"],
                           implementation=FLAGS.implementation,
                           matmul_precision=FLAGS.matmul_precision, run_config=run_config)

    def train(self, name, run_dir, rule, phi, families, values, from_phi=False, first=None):
        """Meta-trains run `name` through every phase (phase 1 continuing `first`, a phase-1 trainer that the output
        scale selection trained part way, when given); returns the best φ of the last phase."""
        started, trainers = time.time(), []
        for index, phase in enumerate(self.phases):
            checkpoint_dir, logdir = self.directories(run_dir, index)
            if index == 0 and first is not None:
                trainer = first
                resumed = trainer.resumed_from   # of the selection's call: this one continues in memory
                trainer.train(phase.epochs, validation_every=FLAGS.validation_every,
                              num_validation_problems=FLAGS.num_validation_problems, checkpoint_dir=checkpoint_dir,
                              checkpoint_every=FLAGS.checkpoint_every, logdir=logdir, patience=FLAGS.patience,
                              restart=True)
                trainer.resumed_from = resumed
                phi = tf.nest.map_structure(tf.constant, trainer.best_phi)
            else:
                trainer = self.trainer(rule, phi, families, index, values, from_phi)
                phi = common.meta_train(trainer, phase.epochs, checkpoint_dir=checkpoint_dir, logdir=logdir)
            trainers.append(trainer)
            print(f"{name}: meta-training phase {index + 1} {phase.as_dict()}: {trainer.epoch} epochs, best validation "
                  f"{trainer.best_validation:.4g}, {trainer.skipped_steps} skipped meta-steps", flush=True)
        self.trainers += trainers
        self.summary[name] = {
            "rule": rule_to_config(rule), "labels": values["labels"], "num_classes": values["num_classes"],
            "examples_per_problem": values["examples_per_problem"], "checkpoint": self.directories(run_dir, 0)[0],
            "epochs": [t.epoch for t in trainers], "best_validation": [t.best_validation for t in trainers],
            "validation_history": [[[int(e), float(v)] for e, v in t.history] for t in trainers],
            "resumed_from": [t.resumed_from for t in trainers], "seconds_this_run": time.time() - started}
        return phi, trainers[-1]


def run_values(name, labels, examples):
    """What defines a run beyond the trainer's own fingerprint (part of its run_config)."""
    return {"run": name, "labels": None if labels is None else list(labels),
            "num_classes": NUM_CLASSES if labels is None else len(labels), "examples_per_problem": examples,
            "output_init_gain": FLAGS.output_init_gain, "validation_size": validation_size(),
            "data_seed": FLAGS.data_seed}


def train_cifar10_lstm(runs, families, examples, start):
    """The CIFAR-10 two-LSTM run, with the output scale chosen on validation; (rule, φ, trainer, selection)."""
    values = run_values("lstm", None, examples)
    start_rule, start_phi = start
    if start_phi is not None:  # --phi: its rule, no choice of scale
        selection = {"from_phi": FLAGS.phi, "chosen": output_scale_of(start_rule)}
        values["output_init_gain"] = None
        phi, trainer = runs.train("lstm", "lstm/from_phi", start_rule, start_phi, families, values, from_phi=True)
        return start_rule, phi, trainer, selection
    scales = output_scales()
    rules = {scale: two_lstm_rule(scale, FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess) for scale in scales}
    if len(scales) == 1:
        scale = scales[0]
        phi, trainer = runs.train("lstm", f"lstm/scale_{scale:g}", rules[scale], fresh_phi(rules[scale]), families,
                                  values)
        return rules[scale], phi, trainer, {"candidates": scales, "chosen": scale, "validation": None}
    # Each scale's phase 1 up to the selection epochs (resumable, in the directory where the chosen one goes on).
    epochs, scores, trainers = FLAGS.scale_selection_epochs, {}, {}
    for scale in scales:
        checkpoint_dir, logdir = runs.directories(f"lstm/scale_{scale:g}", 0)
        trainer = runs.trainer(rules[scale], fresh_phi(rules[scale]), families, 0, values, False)
        common.meta_train(trainer, epochs, checkpoint_dir=checkpoint_dir, logdir=logdir)
        within = [loss for epoch, loss in trainer.history if epoch <= epochs]
        if not within:  # resumed past the selection epochs, none of which was validated: an earlier, larger value
            raise app.UsageError(f"the checkpoint in {checkpoint_dir} holds no validation within the first {epochs} "
                                 "epochs (was --scale_selection_epochs larger when it was written?): pass that value "
                                 "again, or --restart")
        scores[scale] = min(within)
        trainers[scale] = trainer
        print(f"output scale {scale:g}: best validation meta-loss {scores[scale]:.4g} in {epochs} epochs", flush=True)
    chosen = min(scales, key=lambda s: scores[s])
    print(f"output scale chosen on validation: {chosen:g} ({', '.join(f'{s:g}: {v:.4g}' for s, v in scores.items())})",
          flush=True)
    selection = {"candidates": scales, "selection_epochs": epochs, "chosen": chosen,
                 "validation": {f"{s:g}": v for s, v in scores.items()},
                 "validation_histories": {f"{s:g}": [[int(e), float(v)] for e, v in t.history if e <= epochs]
                                          for s, t in trainers.items()}}
    phi, trainer = runs.train("lstm", f"lstm/scale_{chosen:g}", rules[chosen], None, families, values,
                              first=trainers[chosen])
    return rules[chosen], phi, trainer, selection


def export(trainer, path, phases, **metadata):
    trainer.export(path, experiment="cifar", num_steps=FLAGS.num_steps, phases=[p.as_dict() for p in phases],
                   **metadata)


# ---- evaluation ----
def evaluation_path(name):
    return os.path.join(FLAGS.logdir, "evaluation", f"{name}.json")


def evaluation_fingerprint(name, families, learned, examples):
    """What defines a setting's results: a rerun reuses them only when this is the same."""
    return json.loads(json.dumps({
        "setting": name, "labels": setting_labels(name), "steps": FLAGS.num_steps, "seed": FLAGS.seed,
        "examples_per_problem": examples, "num_test_problems": num_test_problems(name),
        "num_validation_problems": FLAGS.num_validation_problems, "baselines": list(FLAGS.baselines),
        "lr_grid": common.lr_grid(),
        "families": {split: families[split].describe() for split in ("validation", "test")},
        "learned": {opt: {"rule": rule_to_config(rule), "phi_sha256": phi_sha256(phi)}
                    for opt, (rule, phi) in learned.items()}}, default=str))


def reusable(name, fingerprint):
    """The saved results of setting `name` when they were evaluated with this fingerprint, else None."""
    path = evaluation_path(name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        saved_fingerprint, results = saved["fingerprint"], saved["results"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"{name}: {path} is unreadable ({error}): evaluating again", flush=True)
        return None
    if saved_fingerprint != fingerprint:
        changed = differences(saved_fingerprint, fingerprint)
        print(f"{name}: {path} was evaluated with other flags, data or φ ({'; '.join(changed[:3])}"
              f"{'; ...' if len(changed) > 3 else ''}): evaluating again", flush=True)
        return None
    return results


def evaluate_setting(name, families, learned, examples, writer, histogram_writer):
    """Tunes the baselines on the setting's validation problems and runs every optimizer on its test problems;
    returns its results.json entry (reused from DIR/evaluation/NAME.json when its fingerprint matches)."""
    fingerprint = evaluation_fingerprint(name, families, learned, examples)
    saved = reusable(name, fingerprint)
    if saved is not None:
        print(f"{name}: reusing {evaluation_path(name)} (evaluated before with the same flags, data and φ)",
              flush=True)
        return saved
    started, steps = time.time(), FLAGS.num_steps
    test = evaluation.Evaluator(families["test"], steps)
    test_seeds = seeds_for("test", num_test_problems(name), FLAGS.seed)
    (rule, phi), others = learned["lstm"], [item for item in learned.items() if item[0] != "lstm"]
    results = evaluation.compare(
        test, baselines.learned(rule, implementation=FLAGS.implementation), phi,
        validation_seeds=seeds_for("validation", FLAGS.num_validation_problems, FLAGS.seed), test_seeds=test_seeds,
        baselines=FLAGS.baselines, grid=common.lr_grid(),
        tuning_evaluator=evaluation.Evaluator(families["validation"], steps),
        log=lambda message: logging.info("%s: %s", name, message))
    for opt, (other_rule, other_phi) in others:
        raw = test.losses(baselines.learned(other_rule, implementation=FLAGS.implementation, name=opt),
                          {"phi": other_phi}, test_seeds)
        results[opt], results["_raw"][opt] = evaluation.summarize(raw), raw
    order = list(learned) + list(FLAGS.baselines)
    results = {**{opt: results[opt] for opt in order}, **{k: v for k, v in results.items() if k.startswith("_")}}
    common.log_evaluation(name, results, rule, phi, families["test"], steps, writer, histogram_writer)
    seconds = time.time() - started
    entry = {"steps": steps, "labels": setting_labels(name), "examples_per_problem": examples,
             "num_test_problems": len(test_seeds), "optimizers": reporting.public(results),
             "tuning": reporting.tuning_table(results), "seconds": seconds}
    reporting.write_json(evaluation_path(name), {"fingerprint": fingerprint, "results": entry})
    logging.info("%s evaluated in %.0f s", name, seconds)
    return entry


def print_table(name, entry):
    steps = entry["steps"]
    reporting.print_table(f"[{name}] mean test loss at step t ({entry['num_test_problems']} problems of "
                          f"{entry['examples_per_problem']} images)", entry["optimizers"], steps,
                          sorted({max(1, round(steps * k / 5)) for k in range(1, 6)}))


# ---- the binary ----
def main(argv):
    del argv
    started = time.time()
    logdir = FLAGS.logdir
    phases = training_phases()  # usage errors before any work (the other flags were checked when parsed)
    start = common.starting_point() if FLAGS.phi else (None, None)
    rules = [two_lstm_rule(scale, FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess) for scale in output_scales()]
    for rule in ([start[0]] if FLAGS.phi else rules):
        common.check_implementation(rule)
    splits = load_data()
    logging.info("CIFAR-10: %s", {k: len(v[1]) for k, v in splits.items()})
    writer = tf.summary.create_file_writer(os.path.join(logdir, "test"))
    histogram_writer = tf.summary.create_file_writer(os.path.join(logdir, "histograms"))
    reporting.log_flags(writer, common.flag_values())
    runs = Runs(phases)
    cifar10 = subset(splits, None)
    examples = {"cifar10": examples_per_problem(cifar10)}
    families10 = cifar_families(cifar10, NUM_CLASSES, FLAGS.batch_size, examples_per_problem=examples["cifar10"])

    # The CIFAR-10 LSTM (every setting evaluates it).
    if phases:
        rule, phi, trainer, selection = train_cifar10_lstm(runs, families10, examples["cifar10"], start)
        for path in [os.path.join(logdir, "phi.npz")] + ([FLAGS.export] if FLAGS.export else []):
            export(trainer, path, phases, run="lstm", output_scale=selection, init_phi=FLAGS.phi,
                   examples_per_problem=examples["cifar10"])
        scale = selection["chosen"]
    else:
        rule, phi = start
        selection = {"from_phi": FLAGS.phi, "chosen": output_scale_of(rule)}
        scale = selection["chosen"] if selection["chosen"] is not None else output_scales()[0]
        print(f"evaluating the φ of {FLAGS.phi} (no meta-training: --num_epochs=0; no lstm_single, no lstm_sub)")

    summary = {"data": {"source": FLAGS.cifar_source, "cifar_dir": FLAGS.cifar_dir,
                        "validation_size": validation_size(), "data_seed": FLAGS.data_seed,
                        "images": {k: len(v[1]) for k, v in splits.items()}},
               "output_scale": selection}
    all_results, panels, seconds = {}, [], {}
    figure = os.path.join(logdir, "figure.png")
    for name in FLAGS.settings:
        setting_started = time.time()
        labels = setting_labels(name)
        learned = {"lstm": (rule, phi)}
        if name == "cifar10":
            evaluated, families = cifar10, families10
            if phases and FLAGS.lstm_single:
                single = LSTMUpdateRule(FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess, output_scale=scale)
                single_phi, single_trainer = runs.train("lstm_single", "lstm_single", single, fresh_phi(single),
                                                        families10, run_values("lstm_single", None, examples[name]))
                export(single_trainer, os.path.join(logdir, "phi_lstm_single.npz"), phases, run="lstm_single",
                       examples_per_problem=examples[name])
                learned["lstm_single"] = (single, single_phi)
        else:
            evaluated = subset(splits, labels, ("validation", "test"))
            others = other_labels(labels)
            sub_splits = subset(splits, others, ("train", "validation")) if phases else {}
            examples[name] = examples_per_problem(evaluated, *([sub_splits] if sub_splits else []))
            families = cifar_families(evaluated, len(labels), FLAGS.batch_size, examples_per_problem=examples[name])
            if phases:
                run = f"lstm_sub_{name}"
                sub_rule = two_lstm_rule(scale, FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess)
                sub_families = cifar_families(sub_splits, len(others), FLAGS.batch_size,
                                              examples_per_problem=examples[name])
                sub_phi, sub_trainer = runs.train(run, run, sub_rule, fresh_phi(sub_rule), sub_families,
                                                  run_values(run, others, examples[name]))
                export(sub_trainer, os.path.join(logdir, f"phi_{run}.npz"), phases, run=run, labels=list(others),
                       examples_per_problem=examples[name])
                learned["lstm_sub"] = (sub_rule, sub_phi)
        entry = evaluate_setting(name, families, learned, examples[name], writer, histogram_writer)
        seconds[name] = time.time() - setting_started
        all_results[name] = entry
        panels.append((f"{TITLES[name]}" + ("" if labels is None else f" (labels {', '.join(map(str, labels))})"),
                       entry["optimizers"]))
        print_table(name, entry)
        # Written after every setting, so a long run leaves usable partial results.
        output = {"settings": all_results, **summary, "meta_training": runs.summary,
                  "seconds_this_run": {"total": time.time() - started, **seconds},
                  **common.run_summary(rule, runs.trainers)}
        reporting.write_json(os.path.join(logdir, "results.json"), output)
        reporting.plot_curves(figure, panels)
    reporting.log_figure(writer, figure)
    print(f"wrote {logdir}/results.json and figure.png in {time.time() - started:.0f} s")


if __name__ == "__main__":
    common.run(main)
