"""Pure-TensorFlow statement of the coordinatewise LSTM step (the reference and the fallback).

Same math and [S, N] state layout as csrc/lstm_step.h, on the φ tree (layout.py). Written with plain TF ops so that
it differentiates (to φ, the state and the gradient input), runs eagerly, in `tf.function` and under XLA. Its inputs
go through the same validation as the fused op's (`config.validate_step_inputs`).

Non-finite gradients, as in the kernels: +inf and -inf act as +FLT_MAX and -FLT_MAX (the largest finite gradient of
that sign: same update, same new state), and the derivative with respect to an infinite gradient is 0 (the clamp is
flat beyond ±FLT_MAX). A NaN gradient gives a NaN update and NaN new state for its coordinate (it is not hidden).
"""
import math

import tensorflow as tf

from l2l_tf.ops.config import FLT_MAX, StepConfig, as_float32, validate_step_inputs

_FLT_EPSILON = float(2.0 ** -23)


def clamp_infinities(grad):
    """±inf → ±FLT_MAX; every finite value (and NaN) unchanged, bit for bit. Differentiable (derivative 1 at finite
    values, 0 at ±inf), XLA-compilable.

    A select rather than tf.clip_by_value: TF's CPU minimum/maximum run with denormals flushed and would turn a
    subnormal gradient into 0 (clip_by_value keeps NaN too, but not every finite input)."""
    signed_max = tf.where(grad > 0, FLT_MAX, -FLT_MAX)
    return tf.where(tf.math.is_inf(grad), signed_max, grad)  # NaN: is_inf is False, NaN stays


def preprocess(grad, config: StepConfig):
    """Gradient features for the LSTM: a [D, N] tensor from a flat float32 [N] gradient.

    "none" → the raw gradient (D = 1). "paper" (Appendix A, parameter p): (log|g|/p, sgn g) when |g| ≥ e^{-p},
    else (−1, e^p g). "clamped" (the authors' release LogAndSign, parameter k):
    (max(log(|g| + ε)/k, −1), clip(g e^k, −1, 1)). ±inf act as ±FLT_MAX; NaN gives NaN features.
    """
    g = clamp_infinities(as_float32(grad, "grad", 1))
    if config.preprocess == "none":
        return g[None, :]
    param = config.preprocess_param
    abs_g = tf.abs(g)
    if config.preprocess == "paper":
        big = abs_g >= tf.constant(math.exp(-param), tf.float32)
        # log of a safe value on the small branch so that its (unused) gradient stays finite.
        log_feature = tf.where(big, tf.math.log(tf.where(big, abs_g, 1.0)) / param, -1.0)
        sign_feature = tf.where(big, tf.sign(g), tf.constant(math.exp(param), tf.float32) * g)
    else:  # "clamped"
        log_feature = tf.maximum(tf.math.log(abs_g + _FLT_EPSILON) / param, -1.0)
        sign_feature = tf.clip_by_value(g * tf.constant(math.exp(param), tf.float32), -1.0, 1.0)
    return tf.stack([log_feature, sign_feature])


_BFLOAT16_MAX = 3.3895314e38  # largest finite bfloat16


def _round_to_bfloat16(x):
    return tf.cast(tf.cast(x, tf.bfloat16), tf.float32)  # round to nearest even


@tf.custom_gradient
def _bfloat16_matmul(w, x):
    """w @ x on bfloat16-rounded inputs with float32 sums, and likewise in the gradient (its GEMMs round the
    upstream gradient and the other input): what the fused kernels' bfloat16 GEMMs compute."""
    # The inputs saturate at bfloat16's largest finite value, as the fused kernels stage them: rounded to nearest, a
    # raw gradient ("none") of ±FLT_MAX (as ±inf acts) would become ±inf and make 0 * inf = NaN in d_phi.
    w16, x16 = _round_to_bfloat16(w), _round_to_bfloat16(tf.clip_by_value(x, -_BFLOAT16_MAX, _BFLOAT16_MAX))

    def grad(dz):
        dz16 = _round_to_bfloat16(dz)
        return tf.matmul(dz16, x16, transpose_b=True), tf.matmul(w16, dz16, transpose_a=True)

    return tf.matmul(w16, x16), grad


def _lstm_cell(layer, inputs, cell, matmul_precision="float32"):
    matmul = _bfloat16_matmul if matmul_precision == "bfloat16" else tf.matmul
    gates = matmul(layer["w"], inputs) + layer["b"][:, None]
    i, f, g, o = tf.split(gates, 4, axis=0)
    new_cell = tf.sigmoid(f) * cell + tf.sigmoid(i) * tf.tanh(g)
    return tf.sigmoid(o) * tf.tanh(new_cell), new_cell


def lstm_step(phi, grad, state, scale, config: StepConfig, matmul_precision="float32"):
    """One step for N coordinates: φ tree, grad [N], state [S, N], scale scalar → (update [N], new state [S, N]).
    matmul_precision "bfloat16": the two gate GEMMs (and their gradients) on bfloat16-rounded inputs."""
    grad, state, scale = validate_step_inputs(grad, state, scale, config)
    h1_units, h2_units = config.hidden1, config.hidden2
    h1, c1, h2, c2 = tf.split(state, [h1_units, h1_units, h2_units, h2_units], axis=0)
    x = preprocess(grad, config)
    h1, c1 = _lstm_cell(phi["lstm1"], tf.concat([x, h1], 0), c1, matmul_precision)
    h2, c2 = _lstm_cell(phi["lstm2"], tf.concat([h1, h2], 0), c2, matmul_precision)
    update = scale * (tf.linalg.matvec(h2, phi["out"]["w"], transpose_a=True) + phi["out"]["b"][0])
    return update, tf.concat([h1, c1, h2, c2], axis=0)
