"""φ files: a rule's weights and configuration in one .npz, written atomically, read with clear errors.

Format version 2 (written here): "format_version" (2), "rule" (JSON of `rule_to_config`), "metadata" (JSON) and one
float32 array per φ leaf named "phi/<path>" (e.g. "phi/conv/lstm1/w"). Version 1 (before rules/, the shipped
files of that time): "phi" (the flat vector of one LSTM, ops/layout.py order) and "config" (the LSTM's arguments,
with a runtime "implementation" that is now ignored). Both load.
"""
import json
import os
import zipfile

import numpy as np
import tensorflow as tf

from l2l_tf.io import atomic_write
from l2l_tf.rules.base import leaf_paths, rule_from_config, rule_to_config, tree_from_paths

FORMAT_VERSION = 2
_PREFIX = "phi/"


def phi_arrays(rule, phi, prefix=_PREFIX):
    """{prefix + leaf path: float32 array} of a φ tree (checked against the rule); also used by checkpoints."""
    phi = rule.as_phi_tree(phi)
    rule.check_phi(phi)
    return {prefix + path: np.asarray(leaf, np.float32) for path, leaf in leaf_paths(phi)}


def phi_from_arrays(rule, arrays, prefix=_PREFIX, where="φ"):
    """The φ tree (float32 tensors) of the `prefix` entries of a mapping written by `phi_arrays`; ValueError names
    a missing, malformed or non-finite leaf."""
    leaves = []
    for path, shape in leaf_paths(rule.phi_shapes()):
        key = prefix + path
        if key not in arrays:
            raise ValueError(f"{where}: missing the φ leaf {path!r}")
        value = np.asarray(arrays[key])
        if value.dtype != np.float32 or value.shape != tuple(shape):
            raise ValueError(f"{where}: φ leaf {path!r} must be float32 of shape {tuple(shape)}, got {value.dtype} "
                             f"{value.shape}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{where}: φ leaf {path!r} holds non-finite values")
        leaves.append((path, tf.constant(value)))
    return tree_from_paths(leaves)


def save_phi(path, rule, phi, **metadata):
    """Writes φ and the rule's configuration to an .npz file (format version 2; temporary file, then rename).

    Raises ValueError naming the leaf, and writes nothing, for a φ with NaN or inf values (`load_phi` refuses
    them: a diverged φ must not replace a good file).
    """
    arrays = phi_arrays(rule, phi)
    for key, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"save_phi: φ leaf {key[len(_PREFIX):]!r} holds non-finite values (NaN or inf); nothing "
                             f"was written to {os.fspath(path)!r}")
    arrays.update(format_version=np.asarray(FORMAT_VERSION), rule=json.dumps(rule_to_config(rule)),
                  metadata=json.dumps(metadata))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def legacy_rule_config(config):
    """The `rule_to_config` form of a version-1 LSTM config (its runtime "implementation" dropped)."""
    return {"name": "lstm", "config": {k: v for k, v in config.items() if k != "implementation"}}


def load_phi(path):
    """Reads a φ file (version 2 or 1): returns (rule, φ tree of float32 tensors, metadata dict).

    Raises FileNotFoundError for a missing file and ValueError naming what is wrong for a bad one.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no φ file at {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a φ file written by save_phi")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path!r} is not a φ file: expected an .npz archive")
        with data:
            files = set(data.files)
            if "format_version" in files:
                version = int(data["format_version"])
                if version != FORMAT_VERSION:
                    raise ValueError(f"{path!r} has φ file format version {version}; this l2l_tf reads versions 1 "
                                     f"and {FORMAT_VERSION}")
                if "rule" not in files:
                    raise ValueError(f"{path!r} is not a φ file: missing ['rule']")
                rule_config = json.loads(str(data["rule"]))
                arrays = {k: data[k] for k in files if k.startswith(_PREFIX)}
                flat = None
            else:
                missing = {"phi", "config"} - files
                if missing:
                    raise ValueError(f"{path!r} is not a φ file: missing {sorted(missing)}")
                rule_config = legacy_rule_config(json.loads(str(data["config"])))
                flat = np.asarray(data["phi"])
            metadata = json.loads(str(data["metadata"])) if "metadata" in files else {}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:  # ValueError: pickles, bad JSON
        if str(error).startswith(repr(path)):
            raise
        raise ValueError(f"{path!r} is not a readable φ file ({error})") from error
    try:
        rule = rule_from_config(rule_config)
    except ValueError as error:
        raise ValueError(f"{path!r}: {error}") from error
    if flat is not None:  # version 1: one LSTM's flat vector
        if flat.dtype != np.float32 or flat.ndim != 1:
            raise ValueError(f"{path!r}: phi must be a float32 vector, got {flat.dtype} with shape {flat.shape}")
        try:
            arrays = phi_arrays(rule, rule.as_phi_tree(flat))
        except ValueError as error:
            raise ValueError(f"{path!r}: {error}") from error
    return rule, phi_from_arrays(rule, arrays, where=repr(path)), metadata
