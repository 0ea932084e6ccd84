"""MetaTrainer checkpoints: `directory/meta_trainer.npz`, written atomically (temporary file, then rename).

Format version 2: "format_version", "state" (JSON: epoch, skipped steps, best validation, seed, the rule's
`rule_to_config`, num_steps, unroll_length, meta_loss), "history", "phi/<leaf>", "best_phi/<leaf>" and
"adam/<variable name>" (Adam's step count, learning rate and per-leaf moments, by name). Checkpoints written before
rules/ (one LSTM's flat φ, Adam's variables by position "adam_<i>", a rule config holding "implementation") are read
too: their flat vectors are split into the leaves with the ops layer's layout.
"""
import json
import os

import numpy as np

from l2l_tf.io import atomic_write
from l2l_tf.rules import leaf_paths, rule_to_config, tree_from_paths
from l2l_tf.rules.phi_files import legacy_rule_config, phi_arrays, phi_from_arrays

FORMAT_VERSION = 2
FILENAME = "meta_trainer.npz"


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
                                    "best_validation": trainer.best_validation, "seed": trainer.seed,
                                    "rule": rule_to_config(trainer.rule), "num_steps": trainer.num_steps,
                                    "unroll_length": trainer.unroll_length, "meta_loss": trainer.meta_loss}))
    atomic_write(checkpoint_path(directory), lambda f: np.savez(f, **arrays))


def _legacy_arrays(trainer, data):
    """A flat-φ checkpoint's arrays in the version-2 names: φ and best φ split into leaves, Adam's moments too."""
    rule = trainer.rule
    arrays = {}
    arrays.update(phi_arrays(rule, rule.as_phi_tree(data["phi"]), "phi/"))
    arrays.update(phi_arrays(rule, rule.as_phi_tree(data["best_phi"]), "best_phi/"))
    legacy = [np.asarray(data[f"adam_{i}"]) for i in range(sum(k.startswith("adam_") for k in data.files))]
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


def restore(trainer, directory):
    """Loads a checkpoint into `trainer`; ValueError when it was written by another configuration."""
    path = checkpoint_path(directory)
    with np.load(path, allow_pickle=False) as data:
        state = json.loads(str(data["state"]))
        legacy = "format_version" not in data.files
        rule_config = legacy_rule_config(state["rule"]) if legacy else state["rule"]
        if rule_config != rule_to_config(trainer.rule) or state["num_steps"] != trainer.num_steps \
                or state["unroll_length"] != trainer.unroll_length \
                or state.get("meta_loss", "sum") != trainer.meta_loss:
            raise ValueError(f"checkpoint in {directory!r} was written by another configuration: {state}")
        arrays = _legacy_arrays(trainer, data) if legacy else {k: data[k] for k in data.files}
        history = data["history"]
    phi = phi_from_arrays(trainer.rule, arrays, "phi/", where=path)
    for (_, variable), (_, value) in zip(leaf_paths(trainer.phi), leaf_paths(phi)):
        variable.assign(value)
    for variable in trainer.optimizer.variables:
        key = _adam_key(variable)
        if key not in arrays:
            raise ValueError(f"{path}: no saved value for the meta-optimizer variable {variable.name!r}")
        variable.assign(arrays[key])
    best = phi_from_arrays(trainer.rule, arrays, "best_phi/", where=path)
    trainer.best_phi = tree_from_paths([(p, np.asarray(v)) for p, v in leaf_paths(best)])
    trainer.history = [tuple(row) for row in history.tolist()]
    trainer.epoch, trainer.skipped_steps = state["epoch"], state["skipped_steps"]
    trainer.best_validation = state["best_validation"]

