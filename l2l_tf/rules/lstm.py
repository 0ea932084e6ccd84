"""The coordinatewise 2-layer LSTM rule of the paper: θ ← θ + output_scale · LSTM_φ(preprocess(∇)).

φ = {"lstm1": {"w": [4·H1, D+H1], "b": [4·H1]}, "lstm2": {"w": [4·H2, H1+H2], "b": [4·H2]},
     "out": {"w": [H2], "b": [1]}}, gate order i, f, g, o; shared by every coordinate. The state holds one
[S, size_i] tensor per parameter tensor (S = 2·(H1 + H2), rows h1 | c1 | h2 | c2), so no two tensors share LSTM
state; nothing is shared across coordinates.
"""
import dataclasses
import math

import numpy as np
import tensorflow as tf

from l2l_tf import ops
from l2l_tf.rules.base import RuleState, UpdateRule, param_specs, register_rule
from l2l_tf.rules.preprocess import Preprocessing


@register_rule("lstm")
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class LSTMUpdateRule(UpdateRule):
    """A coordinatewise 2-layer LSTM optimizer (Andrychowicz et al., 2016).

    Args:
        hidden1: units of the first LSTM layer (paper: 20).
        hidden2: units of the second LSTM layer (paper: 20).
        preprocess: gradient preprocessing: "paper" (LogAndSign, Appendix A, p = 10), "clamped" (the authors'
            release's LogAndSign, k = 5) or "none" (the raw gradient, used for the quadratic experiment).
        preprocess_param: p for "paper" or k for "clamped"; None picks the default.
        output_scale: the LSTM output is multiplied by this (paper: 0.1 on MNIST, 1.0 on quadratics).
    """

    hidden1: int = 20
    hidden2: int = 20
    preprocess: str = "paper"
    preprocess_param: float = None
    output_scale: float = 0.1

    coordinatewise = True
    supports_fused = True
    has_lstm_gemms = True

    def __post_init__(self):
        object.__setattr__(self, "preprocess_param", Preprocessing(self.preprocess, self.preprocess_param).param)
        self.step_config  # validates the sizes
        if not (isinstance(self.output_scale, (int, float)) and math.isfinite(self.output_scale)):
            raise ValueError(f"output_scale must be a finite number, got {self.output_scale!r}")

    @property
    def step_config(self):
        return ops.StepConfig(self.hidden1, self.hidden2, self.preprocess, self.preprocess_param)

    @property
    def num_params(self):
        """P: the number of weights in φ."""
        return self.step_config.num_params

    @property
    def state_rows(self):
        return self.step_config.state_rows

    def get_config(self):
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # ---- φ ----
    def phi_shapes(self):
        return self.step_config.phi_shapes

    def init_phi(self, seed=0, output_gain=1.0):
        """A fresh φ tree: truncated-normal weights with std 1/√fan_in, zero biases, forget-gate bias 1.

        `output_gain` multiplies the output layer's weights: below 1 the untrained rule starts with smaller steps
        (e.g. 0.1 makes output_scale 0.1 start like output_scale 0.01), while the trained rule may still take
        steps as large as `output_scale` allows.
        """
        rng = np.random.default_rng(seed)
        shapes = self.phi_shapes()
        phi = {}
        for layer, part in ops.layout.LEAVES:  # one draw per weight leaf, in this order (the φ of a seed is fixed)
            shape = shapes[layer][part]
            if part == "w":
                value = np.clip(rng.standard_normal(shape), -2.0, 2.0) / math.sqrt(shape[-1])
                if layer == "out":
                    value = value * float(output_gain)
            else:
                value = np.zeros(shape)
                if layer != "out":  # gate order i, f, g, o: the forget gate is the second quarter
                    units = shape[0] // 4
                    value[units:2 * units] = 1.0
            phi.setdefault(layer, {})[part] = tf.constant(value, tf.float32)
        return phi

    def as_phi_tree(self, phi):
        """`phi` as a tree: a tree is returned as it is; a flat [P] vector (the layout before format version 2)
        is split into one."""
        if isinstance(phi, dict):
            return phi
        phi = tf.convert_to_tensor(phi, tf.float32)
        if phi.shape.rank != 1 or phi.shape[0] != self.num_params:
            raise ValueError(f"phi must be a tree of shapes {self.phi_shapes()} (or a flat vector of "
                             f"{self.num_params}), got a tensor of shape {phi.shape}")
        return ops.phi_tree(phi, self.step_config)

    # ---- optimizer functions ----
    def init_state(self, param_specs_or_params):
        """Zero LSTM state: one [S, size] float32 tensor per parameter tensor."""
        specs = param_specs(param_specs_or_params)
        return RuleState(tuple(tf.zeros([self.state_rows, spec.size], tf.float32) for spec in specs), ())

    def step(self, phi, grads, state, *, implementation="auto"):
        """Updates for `grads` (same structure, shapes and dtypes) and the new state.

        θ_{t+1} = θ_t + updates. Gradients of any float dtype are computed in float32 and the updates cast back.
        """
        grads = self.check_grads(grads, state)
        flat = [tf.reshape(tf.cast(g, tf.float32), [-1]) for g in grads]
        updates, states = ops.lstm_steps(self.as_phi_tree(phi), flat, list(state.per_coordinate), self.output_scale,
                                         self.step_config, self.step_implementation(implementation))
        updates = [tf.cast(tf.reshape(u, tf.shape(g)), g.dtype) for u, g in zip(updates, grads)]
        return updates, RuleState(tuple(states), state.shared)
