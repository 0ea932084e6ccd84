"""MetaTrainer checkpoints: `directory/meta_trainer.npz`, written atomically (temporary file, then rename).

Format version 2: "format_version", "state" (JSON: epoch, skipped steps, best validation, validations without
improvement, and the run's `fingerprint`), "history", "phi/<leaf>", "best_phi/<leaf>" and "adam/<variable name>"
(Adam's step count, learning rate and per-leaf moments, by name). Checkpoints written before rules/ (one LSTM's flat
φ, Adam's variables by position "adam_<i>", a rule config holding "implementation") are read too: their flat vectors
are split into the leaves with the ops layer's layout.

A checkpoint is resumed only by the run that wrote it: the fingerprint (rule, problem family, seed, meta-loss and its
weights, steps, unroll length, meta learning rate and its schedule, clipping, second derivatives, and the caller's
`run_config`, e.g. a curriculum) must match, field by field. Not the number of epochs or the patience: a run may be
extended. A mismatch, an unreadable file or a non-finite φ is a `CheckpointError` naming the file and what to do.
"""
import json
import math
import os
import zipfile

import keras
import numpy as np

from l2l_tf.io import atomic_write
from l2l_tf.rules import leaf_paths, rule_to_config, tree_from_paths
from l2l_tf.rules.phi_files import legacy_rule_config, phi_arrays, phi_from_arrays

FORMAT_VERSION = 2
FILENAME = "meta_trainer.npz"
_RESTART = "pass restart=True (binaries: --restart) to start fresh, overwriting it, or use another directory"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: written by another run, unreadable, or holding a non-finite φ."""


def fingerprint(trainer):
    """JSON values that define a meta-training run: what a checkpoint must match to be resumed."""
    learning_rate = trainer.learning_rate
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        learning_rate = keras.optimizers.schedules.serialize(learning_rate)
    validation = trainer.validation_evaluator.family
    return json.loads(json.dumps({
        "rule": rule_to_config(trainer.rule), "family": trainer.family.describe(),
        "validation_family": None if validation is trainer.family else validation.describe(),
        "seed": trainer.seed, "meta_loss": trainer.meta_loss,
        "loss_weights": [float(w) for w in trainer.loss_weights.numpy()], "num_steps": trainer.num_steps,
        "unroll_length": trainer.unroll_length, "meta_learning_rate": learning_rate, "clip_norm": trainer.clip_norm,
        "second_derivatives": trainer.second_derivatives, "run_config": trainer.run_config}, default=str))


def differences(saved, current, prefix=""):
    """["path: saved vs current", ...] where two JSON values differ (dict keys compared one by one)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [line for key in sorted(set(saved) | set(current), key=str)
                for line in differences(saved.get(key), current.get(key), f"{prefix}{key}.")]
    same = saved == current or (isinstance(saved, float) and isinstance(current, float)
                                and math.isclose(saved, current, rel_tol=1e-12))
    if same:
        return []
    short = lambda value: (lambda text: text if len(text) <= 60 else text[:57] + "...")(json.dumps(value))
    return [f"{prefix[:-1]}: {short(saved)} in the checkpoint vs {short(current)} now"]


def checkpoint_path(directory):
    return os.path.join(directory, FILENAME)


def _adam_key(variable):
    return "adam/" + variable.name


def save(trainer, directory):
    """Writes the trainer's whole state to `directory/meta_trainer.npz`."""
    os.makedirs(directory, exist_ok=True)
    arrays = {_adam_key(v): np.asarray(v.numpy()) for v in trainer.optimizer.variables}
    arrays.update(phi_arrays(trainer.rule, trainer.phi_numpy(), "phi/"))
    arrays.update(phi_arrays(trainer.rule, trainer.best_phi, "best_phi/"))
    arrays.update(format_version=np.asarray(FORMAT_VERSION),
                  history=np.asarray(trainer.history, np.float64).reshape(-1, 2),
                  state=json.dumps({"epoch": trainer.epoch, "skipped_steps": trainer.skipped_steps,
                                    "best_validation": trainer.best_validation,
                                    "stale_validations": trainer.stale_validations,
                                    "fingerprint": fingerprint(trainer)}))
    atomic_write(checkpoint_path(directory), lambda f: np.savez(f, **arrays))


def _legacy_arrays(trainer, data):
    """A flat-φ checkpoint's arrays in the version-2 names: φ and best φ split into leaves, Adam's moments too."""
    rule = trainer.rule
    arrays = {}
    arrays.update(phi_arrays(rule, rule.as_phi_tree(data["phi"]), "phi/"))
    arrays.update(phi_arrays(rule, rule.as_phi_tree(data["best_phi"]), "best_phi/"))
    legacy = [np.asarray(data[f"adam_{i}"]) for i in range(sum(k.startswith("adam_") for k in data))]
    scalars = [a for a in legacy if a.ndim == 0]            # iteration (, learning_rate)
    momentum, velocity = [a for a in legacy if a.ndim == 1]  # Adam's slots of the one flat φ, in that order
    slots = {"momentum": phi_arrays(rule, rule.as_phi_tree(momentum), ""),
             "velocity": phi_arrays(rule, rule.as_phi_tree(velocity), "")}
    names = ["iteration", "learning_rate"][:len(scalars)]
    arrays.update({"adam/" + name: value for name, value in zip(names, scalars)})
    for path in slots["momentum"]:
        for kind in ("momentum", "velocity"):
            arrays[f"adam/phi.{path.replace('/', '.')}_{kind}"] = slots[kind][path]  # MetaTrainer's names
    return arrays


def _check_legacy(state, trainer):
    """What a checkpoint from before fingerprints records of its run: rule, seed, steps, unroll, meta-loss."""
    saved = {"rule": legacy_rule_config(state["rule"]), "seed": state["seed"], "num_steps": state["num_steps"],
             "unroll_length": state["unroll_length"], "meta_loss": state.get("meta_loss", "sum")}
    current = fingerprint(trainer)
    return differences(saved, {key: current[key] for key in saved})


def restore(trainer, directory):
    """Loads a checkpoint into `trainer`; CheckpointError when it was written by another run, is unreadable or holds
    a non-finite φ (nothing of the trainer is changed then)."""
    path = checkpoint_path(directory)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        state = json.loads(str(arrays.pop("state")))
        history = np.asarray(arrays.pop("history"), np.float64).reshape(-1, 2)
        legacy = "format_version" not in arrays
        diffs = _check_legacy(state, trainer) if legacy else differences(state["fingerprint"], fingerprint(trainer))
        epoch, skipped, best_validation = int(state["epoch"]), int(state["skipped_steps"]), state["best_validation"]
        stale = int(state.get("stale_validations", 0))
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable meta-trainer checkpoint ({type(error).__name__}: {error}); "
                              f"{_RESTART}") from error
    if diffs:
        raise CheckpointError(f"{path} was written by another run ({'; '.join(diffs)}); {_RESTART}")
    try:
        if legacy:
            arrays = _legacy_arrays(trainer, arrays)
        phi = phi_from_arrays(trainer.rule, arrays, "phi/", where=path)
        best = phi_from_arrays(trainer.rule, arrays, "best_phi/", where=path)
    except ValueError as error:
        raise CheckpointError(f"{error}; {_RESTART}") from error
    missing = [v.name for v in trainer.optimizer.variables if _adam_key(v) not in arrays]
    if missing:
        raise CheckpointError(f"{path}: no saved value for the meta-optimizer variables {missing}; {_RESTART}")
    for (_, variable), (_, value) in zip(leaf_paths(trainer.phi), leaf_paths(phi)):
        variable.assign(value)
    for variable in trainer.optimizer.variables:
        variable.assign(arrays[_adam_key(variable)])
    trainer.best_phi = tree_from_paths([(p, np.asarray(v)) for p, v in leaf_paths(best)])
    trainer.history = [tuple(row) for row in history.tolist()]
    trainer.epoch, trainer.skipped_steps, trainer.best_validation = epoch, skipped, best_validation
    trainer.stale_validations = stale
