"""Static configuration of the LSTM step, and the one validation of a step's inputs, shared by the reference and the
fused op.

`StepConfig` checks the sizes, the preprocessing mode and the range of its parameter where it is built (so every rule,
flag and φ file goes through the same check). `validate_step_inputs` is called by both implementations' entry points
(`fused.lstm_step`, `reference.lstm_step`), so a bad gradient, state or scale raises the same exception with the same
message whichever implementation runs (φ trees are checked by `ops.check_phi_tree`, also for both).
"""
import dataclasses
import math

import numpy as np
import tensorflow as tf

from l2l_tf.ops import layout

PREPROCESS_MODES = ("none", "paper", "clamped")
DEFAULT_PREPROCESS_PARAM = {"none": 0.0, "paper": 10.0, "clamped": 5.0}
# The accepted p ("paper") and k ("clamped"), the same in the kernels (csrc/lstm_step.h). The features use e^p (the
# small-gradient factor), e^-p (the "paper" threshold) and log|g| / p: with p <= 80, e^p <= 5.6e34 and e^-p >= 1.8e-35
# are normal float32 numbers (e^88.8 overflows float32, e^-87.4 is subnormal), and with p >= 0.001 the log feature
# stays below 9e4 in magnitude and its derivative 1/(p g) finite (beyond that the gates saturate for every input).
PREPROCESS_PARAM_RANGE = (1e-3, 80.0)
FLT_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Shape of the coordinatewise LSTM and its input features.

    Args:
        hidden1: units of the first LSTM layer.
        hidden2: units of the second LSTM layer.
        preprocess: "none" (raw gradient, 1 feature), "paper" (LogAndSign with threshold e^{-p}) or
            "clamped" (the authors' release's continuous LogAndSign with k).
        preprocess_param: p for "paper" (default 10), k for "clamped" (default 5); in [0.001, 80]
            (PREPROCESS_PARAM_RANGE: e^p must be a normal float32 number). Unused for "none".
    """

    hidden1: int = 20
    hidden2: int = 20
    preprocess: str = "paper"
    preprocess_param: float = None

    def __post_init__(self):
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")
        for name in ("hidden1", "hidden2"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        param = self.preprocess_param
        if param is None:
            param = DEFAULT_PREPROCESS_PARAM[self.preprocess]
        param = float(param)
        low, high = PREPROCESS_PARAM_RANGE
        if self.preprocess != "none" and not low <= param <= high:  # NaN fails too
            raise ValueError(f"preprocess_param must be in [{low:g}, {high:g}] for preprocess={self.preprocess!r} "
                             f"(e^p must be a normal float32 number: e^88.8 overflows), got {param!r}")
        object.__setattr__(self, "preprocess_param", param)

    @property
    def input_size(self):
        return layout.input_size(self.preprocess)

    @property
    def state_rows(self):
        """S: rows of the per-coordinate state, h1 | c1 | h2 | c2."""
        return 2 * (self.hidden1 + self.hidden2)

    @property
    def activation_rows(self):
        """Rows per coordinate of the activations the fused forward can save for its backward (csrc/lstm_step.h)."""
        return 4 * (self.hidden1 + self.hidden2)

    @property
    def phi_shapes(self):
        """The φ tree's leaf shapes: {"lstm1": {"w", "b"}, "lstm2": {"w", "b"}, "out": {"w", "b"}}."""
        return layout.phi_shapes(self.hidden1, self.hidden2, self.input_size)

    @property
    def num_params(self):
        """P: the number of weights in φ."""
        return layout.num_params(self.hidden1, self.hidden2, self.input_size)


# ---- input validation, shared by both implementations

def as_float32(value, name, rank):
    """`value` as a float32 tensor of the given rank (checked only when the rank is known).

    TypeError when it has another dtype (tensors and arrays are never cast silently), ValueError for another rank.
    """
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        try:
            dtype = tf.as_dtype(dtype)
        except TypeError:
            raise TypeError(f"lstm_step: {name} must be float32, got {dtype}") from None
        if dtype != tf.float32:
            raise TypeError(f"lstm_step: {name} must be float32, got {dtype.name}"
                            + (" (the state dtype is float32; cast with tf.cast)" if name == "state" else ""))
        tensor = tf.convert_to_tensor(value)
    else:
        try:
            tensor = tf.convert_to_tensor(value, tf.float32)
        except (TypeError, ValueError) as e:
            raise TypeError(f"lstm_step: {name} must be convertible to float32: {e}") from None
    if tensor.shape.rank is not None and tensor.shape.rank != rank:
        what = {0: "a scalar", 1: "[N]", 2: "[S, N]"}[rank]
        raise ValueError(f"lstm_step: {name} must have rank {rank} ({what}), got shape {tensor.shape}")
    return tensor


def _finite_scale_error(value):
    value = float(value)
    if math.isfinite(value) and abs(value) <= FLT_MAX:
        return None
    return ValueError(f"lstm_step: scale must be finite, got {value!r}"
                      + (" (overflows float32)" if math.isfinite(value) else ""))


def check_scale(scale):
    """The output scale as a float32 scalar tensor: TypeError for another dtype, ValueError for another rank or a
    NaN/Inf value known when the step is built (a Python or NumPy number, an eager tensor, a graph constant).

    A scale known only at run time gets a run-time check instead (InvalidArgumentError "lstm_step: scale must be
    finite", the same for both implementations); XLA has no run-time errors, so under jit_compile it is not checked.
    """
    if isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, (bool, np.bool_)):
        error = _finite_scale_error(scale)
        if error is not None:
            raise error
        return tf.constant(float(scale), tf.float32)
    tensor = as_float32(scale, "scale", 0)
    value = tf.get_static_value(tensor)
    if value is not None:
        error = _finite_scale_error(np.asarray(value).reshape(-1)[0]) if np.size(value) == 1 else None
        if error is not None:
            raise error
        return tensor
    check = tf.debugging.check_numerics(tf.stop_gradient(tensor), "lstm_step: scale must be finite")
    with tf.control_dependencies([check]):
        return tf.identity(tensor)


def validate_step_inputs(grad, state, scale, config: StepConfig):
    """The checks of one step's inputs, the same for the fused op and the reference: (grad, state, scale) as float32
    tensors of shapes [N], [S, N] and [] (S = 2·(hidden1 + hidden2)).

    Raises TypeError for a non-float32 grad, state or scale (naming the argument and the dtype) and ValueError for a
    wrong rank, a state with other than S rows, grad and state disagreeing on N, or a NaN/Inf scale. Shapes are
    checked where they are known when the step is built (in a tf.function with unknown dimensions the fused op checks
    them again at run time). The preprocessing parameter is checked where `config` was built.
    """
    if not isinstance(config, StepConfig):
        raise TypeError(f"lstm_step: config must be a StepConfig, got {type(config).__name__}")
    grad = as_float32(grad, "grad", 1)
    state = as_float32(state, "state", 2)
    scale = check_scale(scale)
    if state.shape.rank is not None:
        rows, n_state = state.shape[0], state.shape[1]
        if rows is not None and rows != config.state_rows:
            raise ValueError(f"lstm_step: state must have {config.state_rows} rows (2*(hidden1+hidden2)) for hidden "
                             f"sizes {config.hidden1}/{config.hidden2}, got shape {state.shape}")
        n = grad.shape[0] if grad.shape.rank is not None else None
        if n is not None and n_state is not None and n != n_state:
            raise ValueError(f"lstm_step: grad [N] and state [S, N] disagree on N: {grad.shape} vs {state.shape}")
    return grad, state, scale
