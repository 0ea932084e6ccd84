"""The learned update rule as pure functions: θ ← θ + scale · LSTM(preprocess(∇)).

Shape of the API follows optax: `init_state(params)` gives the optimizer state, `step(phi, grads, state)` gives
(updates, new_state). φ is one flat float32 vector shared by every coordinate (layout in `ops.StepConfig`); the
state holds one [S, n] tensor per parameter tensor, so no two tensors ever share LSTM state and the rule is the
same whether it serves meta-training (differentiable in φ and the state) or the Keras optimizer.
"""
import dataclasses
import json
import math
import os
import zipfile
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from l2l_tf import ops
from l2l_tf.io import atomic_write


class LSTMOptimizerState(NamedTuple):
    """Per-parameter-tensor LSTM state: a tuple of float32 [S, size_i] tensors (rows h1 | c1 | h2 | c2)."""

    lstm: tuple


@dataclasses.dataclass(frozen=True)
class LSTMUpdateRule:
    """A coordinatewise 2-layer LSTM optimizer (Andrychowicz et al., 2016).

    Args:
        hidden1: units of the first LSTM layer (paper: 20).
        hidden2: units of the second LSTM layer (paper: 20).
        preprocess: gradient preprocessing: "paper" (LogAndSign, Appendix A, p = 10), "clamped" (the authors'
            release's LogAndSign, k = 5) or "none" (the raw gradient, used for the quadratic experiment).
        preprocess_param: p for "paper" or k for "clamped"; None picks the default.
        output_scale: the LSTM output is multiplied by this (paper: 0.1 on MNIST, 1.0 on quadratics).
        implementation: "auto", "fused" (the compiled op; an error if not built) or "reference" (pure TF).
    """

    hidden1: int = 20
    hidden2: int = 20
    preprocess: str = "paper"
    preprocess_param: float = None
    output_scale: float = 0.1
    implementation: str = "auto"

    def __post_init__(self):
        config = ops.StepConfig(self.hidden1, self.hidden2, self.preprocess, self.preprocess_param)
        object.__setattr__(self, "preprocess_param", config.preprocess_param)
        if not (isinstance(self.output_scale, (int, float)) and math.isfinite(self.output_scale)):
            raise ValueError(f"output_scale must be a finite number, got {self.output_scale!r}")
        ops.check_implementation(self.implementation)

    @property
    def step_config(self):
        return ops.StepConfig(self.hidden1, self.hidden2, self.preprocess, self.preprocess_param)

    @property
    def num_params(self):
        """P: the size of the flat φ."""
        return self.step_config.num_params

    @property
    def state_rows(self):
        return self.step_config.state_rows

    def get_config(self):
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # ---- φ ----
    def init_phi(self, seed=0, output_gain=1.0):
        """A fresh float32 [P] φ: truncated-normal weights with std 1/√fan_in, zero biases, forget-gate bias 1.

        `output_gain` multiplies the output layer's weights: below 1 the untrained rule starts with smaller steps
        (e.g. 0.1 makes output_scale 0.1 start like output_scale 0.01), while the trained rule may still take
        steps as large as `output_scale` allows.
        """
        rng = np.random.default_rng(seed)
        pieces = []
        for name, shape in self.step_config.param_shapes:
            if name.startswith("w"):
                fan_in = shape[-1]
                value = np.clip(rng.standard_normal(shape), -2.0, 2.0) / math.sqrt(fan_in)
                if name == "wo":
                    value = value * float(output_gain)
            else:
                value = np.zeros(shape)
                if name in ("b1", "b2"):  # gate order i, f, g, o: the forget gate is the second quarter
                    units = shape[0] // 4
                    value[units:2 * units] = 1.0
            pieces.append(value.reshape(-1))
        return tf.constant(np.concatenate(pieces), tf.float32)

    def named_phi(self, phi):
        """{"w1", "b1", "w2", "b2", "wo", "bo"} views of a flat φ, for inspection."""
        names = [name for name, _ in self.step_config.param_shapes]
        return dict(zip(names, self.step_config.split_phi(phi)))

    def check_phi(self, phi):
        """Raises ValueError unless φ is a rank-1 tensor of this rule's size."""
        shape = tuple(phi.shape)
        if shape != (self.num_params,):
            raise ValueError(
                f"phi must have shape ({self.num_params},) for hidden sizes {self.hidden1}/{self.hidden2} and "
                f"preprocess={self.preprocess!r}, got {shape}")

    # ---- optimizer functions ----
    def init_state(self, params):
        """Zero LSTM state for a list of parameter tensors (any shapes, one state tensor each)."""
        return LSTMOptimizerState(tuple(
            tf.zeros([self.state_rows, _num_elements(p)], tf.float32) for p in params))

    def step(self, phi, grads, state):
        """Updates for `grads` (same structure, shapes and dtypes) and the new state.

        θ_{t+1} = θ_t + updates. Gradients of any float dtype are computed in float32 and the updates cast back.
        """
        grads = list(grads)
        if len(grads) != len(state.lstm):
            raise ValueError(f"got {len(grads)} gradients for an optimizer state of {len(state.lstm)} tensors")
        config = self.step_config
        updates, new_state = [], []
        for grad, lstm_state in zip(grads, state.lstm):
            flat = tf.reshape(tf.cast(grad, tf.float32), [-1])
            update, lstm_state = ops.lstm_step(phi, flat, lstm_state, self.output_scale, config,
                                               self.implementation)
            updates.append(tf.cast(tf.reshape(update, tf.shape(grad)), grad.dtype))
            new_state.append(lstm_state)
        return updates, LSTMOptimizerState(tuple(new_state))


def _num_elements(tensor):
    size = tf.TensorShape(tensor.shape).num_elements()
    if size is None:
        raise ValueError(f"parameter tensors need a fully known shape, got {tensor.shape}")
    return size


def save_phi(path, rule, phi, **metadata):
    """Writes φ and the rule's configuration to an .npz file (write to a temporary file, then rename)."""
    rule.check_phi(phi)
    atomic_write(path, lambda f: np.savez(f, phi=np.asarray(phi, np.float32), config=json.dumps(rule.get_config()),
                                          metadata=json.dumps(metadata)))


def load_phi(path):
    """Reads an .npz written by `save_phi`: returns (rule, phi [P] float32 tensor, metadata dict).

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
            missing = {"phi", "config"} - set(data.files)
            if missing:
                raise ValueError(f"{path!r} is not a φ file: missing {sorted(missing)}")
            phi = np.asarray(data["phi"])
            config = json.loads(str(data["config"]))
            metadata = json.loads(str(data["metadata"])) if "metadata" in data.files else {}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:  # ValueError: pickles, bad JSON
        if str(error).startswith(repr(path)):
            raise
        raise ValueError(f"{path!r} is not a readable φ file ({error})") from error
    if phi.dtype != np.float32 or phi.ndim != 1:
        raise ValueError(f"{path!r}: phi must be a float32 vector, got {phi.dtype} with shape {phi.shape}")
    if not np.all(np.isfinite(phi)):
        raise ValueError(f"{path!r}: phi holds non-finite values")
    try:
        rule = LSTMUpdateRule(**config)
    except TypeError as error:
        raise ValueError(f"{path!r}: unknown update-rule configuration {config} ({error})") from error
    rule.check_phi(tf.constant(phi))
    return rule, tf.constant(phi), metadata
