"""The ops layer: one switch between the fused custom op and the pure-TF reference.

    updates, new_states = lstm_steps(phi, grads, states, scale, config, implementation="auto")

φ is the named tree of `layout.py`; `grads` are flat [N_i] tensors and `states` their [S, N_i] states. "reference"
always works. "fused" uses the compiled op library (csrc/) and raises when it was not built. "auto" uses the fused
op when it is built and the caller is not being compiled by XLA (custom ops have no XLA kernel) and, inside
`matmul_precision("bfloat16")`, the op has the bfloat16 GEMMs (AVX512_BF16); else the reference.
The fused kernels read φ as one flat vector: `flat_phi` builds it (differentiably) from the tree, once per call
(inside `sharing_flat_phi`, as in a meta-training unroll, once per tree).

Both implementations check their inputs the same way, with the same exceptions and messages: the φ tree by
`check_phi_tree` (leaf shapes, float32), grad / state / scale by `validate_step_inputs` (float32, [N] and [S, N],
a finite scale), the preprocessing parameter where the `StepConfig` is built (0.001 ≤ p ≤ 80).

Non-finite gradients, the same in every implementation (csrc/lstm_step.h): +inf and -inf act as +FLT_MAX and
-FLT_MAX, the largest finite gradient of that sign (same update, same new state; the sign is kept), and the gradient
with respect to them is 0 (the clamp is flat beyond ±FLT_MAX). NaN propagates: a NaN gradient gives a NaN update and a
NaN new state for its coordinate (and NaN in the gradients that depend on it); other coordinates are unaffected.
"""
import contextlib
import threading

import tensorflow as tf

from l2l_tf.ops import fused, layout, library, reference
from l2l_tf.ops.config import (DEFAULT_PREPROCESS_PARAM, PREPROCESS_MODES, PREPROCESS_PARAM_RANGE, StepConfig,
                               validate_step_inputs)

IMPLEMENTATIONS = ("auto", "fused", "reference")


def fused_available():
    """True when the compiled op library loaded."""
    return fused.available()


def fused_bf16_available():
    """True when the op library loaded and its CPU kernels have the bfloat16 GEMMs (built with AVX512_BF16), so that
    fused steps run inside `matmul_precision("bfloat16")`. Asked of the pybind11 module, which setup.py and Bazel
    build from the same kernels with the same flags."""
    if not fused.available():
        return False
    try:
        return bool(library.load_kernels().bf16_matmul_available())
    except library.OpsDirError:  # L2L_TF_OPS_DIR names a directory without it: an error, as for the op library
        raise
    except ImportError:
        return False


def fused_load_error():
    """Why the compiled op library is unavailable (None when it loaded)."""
    return fused.load_error()


def inside_xla_compilation():
    """True while tracing code that XLA will compile (`jit_compile=True`), where the custom op cannot run."""
    return fused.inside_xla_compilation()


def check_implementation(implementation):
    """Validates an `implementation` argument up front (so "fused" without the op fails at construction)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "fused" and not fused.available():
        raise RuntimeError(
            "implementation='fused' was requested but the l2l_tf op library is not available "
            f"({fused.load_error()}); rebuild with `pip install -e .` or use implementation='reference'.")
    return implementation


def resolve_implementation(implementation):
    """"fused" or "reference": what `lstm_step` will run for this argument in the current tracing context."""
    check_implementation(implementation)
    if implementation == "auto":
        # The op has no XLA kernel, and without AVX512_BF16 no bfloat16 GEMMs: "auto" takes the pure-TF path there.
        runnable = fused.available() and not fused.inside_xla_compilation()
        if runnable and current_matmul_precision() == "bfloat16":
            runnable = fused_bf16_available()
        return "fused" if runnable else "reference"
    if implementation == "fused" and fused.inside_xla_compilation():
        raise RuntimeError("implementation='fused' cannot run inside an XLA compilation (jit_compile=True): "
                           "the custom op has no XLA kernel. Use implementation='auto' or 'reference'.")
    return implementation


def flat_phi(phi, config: StepConfig):
    """The fused kernels' flat float32 [P] φ from a φ tree (gradients flow back to the leaves); inside
    `sharing_flat_phi`, built once per tree of graph tensors."""
    check_phi_tree(phi, config)
    cache = getattr(_shared_phi, "cache", None)
    leaves = [phi[layer][part] for layer, part in layout.LEAVES]
    if cache is None or tf.executing_eagerly() or not all(isinstance(leaf, tf.Tensor) for leaf in leaves):
        return layout.flatten(phi, concat=tf.concat, reshape=tf.reshape)
    # Graph tensors are immutable values (a variable is not: it may be assigned between steps).
    key = (id(tf.compat.v1.get_default_graph()), tuple(leaf.ref() for leaf in leaves))
    if key not in cache:
        cache[key] = layout.flatten(phi, concat=tf.concat, reshape=tf.reshape)
    return cache[key]


_shared_phi = threading.local()


@contextlib.contextmanager
def sharing_flat_phi():
    """Fused steps built inside on the same φ tree (of graph tensors) share one flat φ, as a meta-training unroll's
    steps do. Its gradient is then one AddN of the steps' d_φ, a sum in a fixed order. Flattened per step, each
    leaf's gradient was an AddN of slices of every step's d_φ; AddN accumulates into the first input whose buffer it
    may reuse, and for a slice that depends on when the other slices of the same d_φ are released, so the order of
    the sum, and the last bits of the meta-gradient, changed from run to run."""
    previous = getattr(_shared_phi, "cache", None)
    _shared_phi.cache = {}
    try:
        yield
    finally:
        _shared_phi.cache = previous


def phi_tree(flat, config: StepConfig):
    """The φ tree of a flat [P] φ (the layout of the kernels and of φ files written before format version 2)."""
    return layout.unflatten(tf.convert_to_tensor(flat, tf.float32), config.hidden1, config.hidden2,
                            config.input_size, reshape=tf.reshape)


def check_phi_tree(phi, config: StepConfig):
    """Raises ValueError naming the first leaf of `phi` that is missing or has the wrong shape for `config`, TypeError
    for a leaf that is not float32 (both implementations call this)."""
    shapes = config.phi_shapes
    if not isinstance(phi, dict) or set(phi) != set(shapes):
        got = sorted(phi) if isinstance(phi, dict) else type(phi).__name__
        raise ValueError(f"phi must be a tree with layers {sorted(shapes)}, got {got}")
    for layer, part in layout.LEAVES:
        leaf = phi[layer].get(part) if isinstance(phi[layer], dict) else None
        if leaf is None:
            raise ValueError(f"phi is missing the leaf {layer}/{part}")
        shape = tuple(leaf.shape)
        if shape != shapes[layer][part]:
            raise ValueError(f"phi leaf {layer}/{part} must have shape {shapes[layer][part]} for hidden sizes "
                             f"{config.hidden1}/{config.hidden2} and preprocess={config.preprocess!r}, got {shape}")
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and tf.as_dtype(dtype) != tf.float32:
            raise TypeError(f"phi leaf {layer}/{part} must be float32, got {tf.as_dtype(dtype).name}")


def preprocess(grad, config: StepConfig):
    """The [D, N] features the LSTM reads of a flat [N] gradient (pure TF, differentiable; the kernels compute the
    same inside the fused step)."""
    return reference.preprocess(grad, config)


_saving = threading.local()


@contextlib.contextmanager
def saving_activations(max_bytes):
    """Fused steps built inside keep their activations for their gradient (instead of the gradient recomputing
    them), up to `max_bytes` of activations in all: a step whose activations would pass that recomputes them. For
    code whose gradient follows (a meta-training unroll); the saved activations live until the gradient has run, so
    the budget bounds the extra memory. Steps outside any such block save nothing."""
    previous = getattr(_saving, "budget", None)
    _saving.budget = [int(max_bytes)]
    try:
        yield
    finally:
        _saving.budget = previous


MATMUL_PRECISIONS = ("float32", "bfloat16")
_precision = threading.local()


def check_matmul_precision(precision):
    """Validates a `matmul_precision` argument (so a bad one fails where it is given, not when a step is built)."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")
    return precision


@contextlib.contextmanager
def matmul_precision(precision):
    """LSTM steps built inside run their three GEMMs (gates, input gradient, weight gradient) in `precision`:
    "float32" (the default everywhere) or "bfloat16": inputs rounded to bfloat16 (round to nearest even; the raw
    gradient of preprocess "none" saturated at the largest finite bfloat16 rather than rounded to ±inf), products
    summed in float32; the pointwise LSTM math stays float32. The fused CPU op runs it with AVX512_BF16 dot products
    (twice the float32 rate; an op built without them raises); the reference rounds the same GEMM inputs, also in
    its gradient, so the two agree to float32 rounding. Results move by ~0.1-0.3% of their size (README: precision).
    Read when the step is built (traced), like `saving_activations`."""
    check_matmul_precision(precision)
    previous = getattr(_precision, "value", None)
    _precision.value = precision
    try:
        yield
    finally:
        _precision.value = previous


def current_matmul_precision():
    """The precision of the innermost `matmul_precision` block ("float32" outside any)."""
    return getattr(_precision, "value", None) or "float32"


def _take_activation_budget(grads, config):
    """True (and the budget charged) when the saving block around this call has room for these steps' activations."""
    budget = getattr(_saving, "budget", None)
    if not budget:
        return False
    sizes = [g.shape[0] if g.shape.rank == 1 else None for g in grads]
    if any(n is None for n in sizes):
        return False
    need = 4 * config.activation_rows * sum(sizes)
    if need > budget[0]:
        return False
    budget[0] -= need
    return True


def lstm_steps(phi, grads, states, scale, config: StepConfig, implementation="auto"):
    """One coordinatewise LSTM step for each flat gradient [N_i] with its state [S, N_i]: (updates, new states).

    Either implementation validates its inputs with `check_phi_tree` and `validate_step_inputs` (the same errors).
    ±inf gradients act as ±FLT_MAX, NaN gradients give NaN updates (see the module docstring). Inside
    `saving_activations` the fused op keeps its activations for its gradient; inside `matmul_precision("bfloat16")`
    both implementations round the GEMM inputs to bfloat16.
    """
    precision = current_matmul_precision()
    if resolve_implementation(implementation) == "fused":
        flat = flat_phi(phi, config)
        grads = [tf.convert_to_tensor(g) for g in grads]
        return fused.lstm_steps(flat, grads, states, scale, config,  # one op call for all the tensors
                                save_activations=_take_activation_budget(grads, config), matmul_precision=precision)
    check_phi_tree(phi, config)
    results = [reference.lstm_step(phi, g, s, scale, config, matmul_precision=precision)
               for g, s in zip(grads, states)]
    return [u for u, _ in results], [s for _, s in results]


def lstm_step(phi, grad, state, scale, config: StepConfig, implementation="auto"):
    """One coordinatewise LSTM step on a flat gradient: φ tree, grad [N], state [S, N] → (update [N], state)."""
    (update,), (new_state,) = lstm_steps(phi, [grad], [state], scale, config, implementation)
    return update, new_state


__all__ = ["StepConfig", "PREPROCESS_MODES", "DEFAULT_PREPROCESS_PARAM", "PREPROCESS_PARAM_RANGE", "IMPLEMENTATIONS",
           "lstm_step", "lstm_steps", "saving_activations", "sharing_flat_phi", "matmul_precision",
           "current_matmul_precision", "check_matmul_precision", "MATMUL_PRECISIONS", "preprocess", "flat_phi",
           "phi_tree", "check_phi_tree",
           "validate_step_inputs", "fused_available", "fused_bf16_available", "fused_load_error",
           "inside_xla_compilation", "check_implementation", "resolve_implementation", "layout"]
