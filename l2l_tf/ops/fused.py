"""The fused custom op (csrc/tf_op.cc) behind the `lstm_step` switch.

The op library `l2l_tf/_lstm_step_ops.so` is built by `pip install -e .` (setup.py). It is loaded lazily, once;
when it is missing or does not load, `available()` is False, `load_error()` says why, and one log line per process
says that the pure-TF reference is used instead. With L2L_TF_OPS_DIR set (`library.py`), the library is loaded from
that directory (e.g. Bazel's `bazel-bin/csrc`) and must be there: a missing or unloadable file is an
`library.OpsDirError` naming the directory, raised by `available()` and every use of the op, not a fallback.
"""
import logging
import os
import threading

import tensorflow as tf

from l2l_tf.ops import library
from l2l_tf.ops.config import StepConfig, as_float32, validate_step_inputs

_logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded = False
_module = None
_error = None


def library_path():
    """Where the op library is expected: <L2L_TF_OPS_DIR>/_lstm_step_ops.so when L2L_TF_OPS_DIR is set (OpsDirError
    when it is not there), else next to the `l2l_tf` package's __init__ (l2l_tf/_lstm_step_ops.so)."""
    return library.op_library_path()


@tf.autograph.experimental.do_not_convert  # plain Python (file checks, a lock), also when called while tracing
def _load():
    global _loaded, _module, _error
    if _loaded:
        return _module
    with _lock:
        if _loaded:
            return _module
        path = library_path()  # raises library.OpsDirError when L2L_TF_OPS_DIR lacks the library
        if not os.path.exists(path):
            _error = f"{path} is not built (run `pip install -e .` in the repository)"
        else:
            try:
                _module = tf.load_op_library(path)
            except Exception as e:  # tf.errors.NotFoundError (undefined symbol, ABI), OSError, ...
                if library.in_ops_dir(path):  # asked for by L2L_TF_OPS_DIR: no fallback
                    raise library.OpsDirError(f"{library.ENV_VAR}={library.ops_dir()}: {path} failed to load: "
                                              f"{type(e).__name__}: {e}".strip()) from e
                _module = None
                _error = f"{path} failed to load: {type(e).__name__}: {e}".strip()
        if _module is None:
            _logger.warning("l2l_tf: fused LSTM-step op unavailable, using the pure-TensorFlow implementation (%s)",
                            _error)
        _loaded = True
    return _module


def available():
    """True when the op library loaded (loads it on the first call)."""
    return _load() is not None


def load_error():
    """Why the op library is unavailable (None when it loaded)."""
    _load()
    return _error


def inside_xla_compilation():
    """True while tracing code that XLA will compile: inside `tf.function(jit_compile=True)` (also in functions
    nested in one) and so inside a Keras train step of a model compiled with `jit_compile=True`.

    TF enters an XLA control-flow context while tracing a jit-compiled function; TF's own ops use
    `control_flow_util.GraphOrParentsInXlaContext` to detect it, walking the default graph and its outer graphs.
    """
    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    try:
        from tensorflow.python.ops import control_flow_util
        return bool(control_flow_util.GraphOrParentsInXlaContext(graph))
    except (ImportError, AttributeError):  # pragma: no cover - private API moved: same walk by hand
        while graph is not None:
            ctx = getattr(graph, "_get_control_flow_context", lambda: None)()
            while ctx is not None:
                if getattr(ctx, "IsXLAContext", lambda: False)():
                    return True
                ctx = getattr(ctx, "outer_context", None)
            graph = getattr(graph, "outer_graph", None)
        return False


def lstm_step(phi, grad, state, scale, config: StepConfig):
    """One step with the fused op: phi [P], grad [N], state [S, N] (float32), scale scalar → (update, new_state).

    grad, state and scale go through `config.validate_step_inputs`, the reference's validation (same errors, same
    messages); the flat φ is checked here (the φ tree, for both implementations, by `ops.check_phi_tree`).
    """
    module = _load()
    if module is None:
        raise RuntimeError(f"the fused lstm_step op is not available: {_error}")
    grad, state, scale = validate_step_inputs(grad, state, scale, config)
    phi = as_float32(phi, "phi", 1)
    p = phi.shape[0] if phi.shape.rank is not None else None
    if p is not None and p != config.num_params:
        raise ValueError(f"lstm_step: phi must have {config.num_params} elements for {config}, got {p}")
    return module.l2l_lstm_step(phi, grad, state, scale, hidden1=config.hidden1, hidden2=config.hidden2,
                                preprocess=config.preprocess, preprocess_param=config.preprocess_param)


def lstm_steps(phi, grads, states, scale, config: StepConfig, save_activations=False, matmul_precision="float32"):
    """One step of every tensor with one call of the fused op (`L2lLstmStepMulti`): phi [P], grads [N_i], states
    [S, N_i], scale → (updates, new_states). One launch and one split of all the tensors' chunks over the threads, so
    a 10-coordinate bias rides along with the 15,680-coordinate kernel instead of paying a call of its own.

    save_activations: the CPU kernel also writes the activations its gradient needs ([4 (H1 + H2), N_i] each, kept
    by TensorFlow until the gradient runs), so the gradient does not recompute them (the forward's gate GEMMs and
    pointwise math). Worth it where a gradient follows (meta-training), and only then.

    matmul_precision: "bfloat16" runs the forward's GEMMs, and those of its gradient, on bfloat16-rounded inputs
    (the op's attr; CPU kernels built with AVX512_BF16)."""
    module = _load()
    if module is None:
        raise RuntimeError(f"the fused lstm_step op is not available: {_error}")
    checked = [validate_step_inputs(g, s, scale, config) for g, s in zip(grads, states)]
    if not checked:
        return [], []
    grads, states, scale = [g for g, _, _ in checked], [s for _, s, _ in checked], checked[0][2]
    phi = as_float32(phi, "phi", 1)
    p = phi.shape[0] if phi.shape.rank is not None else None
    if p is not None and p != config.num_params:
        raise ValueError(f"lstm_step: phi must have {config.num_params} elements for {config}, got {p}")
    updates, new_states, _ = module.l2l_lstm_step_multi(
        phi, grads, states, scale, hidden1=config.hidden1, hidden2=config.hidden2, preprocess=config.preprocess,
        preprocess_param=config.preprocess_param, save_activations=bool(save_activations),
        matmul_precision=matmul_precision)
    return list(updates), list(new_states)


def _lstm_step_grad(op, d_update, d_new_state):
    module = _load()
    if module is None:  # only reachable if an op was built from another copy of the library
        raise RuntimeError(f"the fused lstm_step op is not available: {_error}")
    phi, grad, state, scale = op.inputs
    if d_update is None:
        d_update = tf.zeros_like(grad)
    if d_new_state is None:
        d_new_state = tf.zeros_like(state)
    d_phi, d_grad, d_state = module.l2l_lstm_step_grad(
        phi, grad, state, scale, d_update, d_new_state, hidden1=op.get_attr("hidden1"),
        hidden2=op.get_attr("hidden2"), preprocess=op.get_attr("preprocess"),
        preprocess_param=op.get_attr("preprocess_param"), matmul_precision=op.get_attr("matmul_precision"))
    return [d_phi, d_grad, d_state, None]  # no gradient to scale


def _no_gradient_flows_back(tensor, depth=8):
    """True when a gradient with respect to graph tensor `tensor` cannot reach anything: it is a stop_gradient's
    output or a constant, or computed (within `depth` ops) from only such tensors (whatever the op, its gradient
    goes to its inputs only). Function arguments, variable reads and eager tensors count as reachable."""
    op = getattr(tensor, "op", None)
    if op is None:  # eager: no graph to look at
        return False
    if op.type in ("StopGradient", "Const"):
        return True
    if depth == 0 or not op.inputs:
        return False
    return all(_no_gradient_flows_back(t, depth - 1) for t in op.inputs)


def _lstm_step_multi_grad(op, *upstream):
    module = _load()
    if module is None:  # only reachable if an op was built from another copy of the library
        raise RuntimeError(f"the fused lstm_step op is not available: {_error}")
    count = op.get_attr("N")
    phi, grads, states, scale = op.inputs[0], op.inputs[1:1 + count], op.inputs[1 + count:1 + 2 * count], op.inputs[-1]
    d_updates = [tf.zeros_like(g) if d is None else d for g, d in zip(grads, upstream[:count])]
    # A state whose new value is not used further (the last step of an unroll) has no upstream gradient: the op
    # takes an empty [0] tensor for its zeros instead of an [S, N] one.
    d_new_states = [tf.zeros([0], tf.float32) if d is None else d for d in upstream[count:2 * count]]
    # The activations the forward saved; they have no gradient of their own (upstream[2 N:] is None). Where it saved
    # none, [0, N] stand-ins (the kernel then recomputes them) rather than the op's empty outputs, so that the
    # gradient does not wait for the forward op when nothing else makes it (a linear loss's constant upstream).
    if op.get_attr("save_activations"):
        activations = op.outputs[2 * count:3 * count]
    else:
        activations = [tf.zeros(tf.stack([0, tf.shape(g)[0]]), tf.float32) for g in grads]
    # The optimizee gradients under a stop-gradient (a first-order meta-gradient): their gradient is not computed
    # (the kernel skips layer 1's input rows of the input gradient; d_phi and d_states are the same bit for bit).
    input_gradients = not all(_no_gradient_flows_back(g) for g in grads)
    d_phi, d_grads, d_states = module.l2l_lstm_step_multi_grad(
        phi, grads, states, scale, d_updates, d_new_states, activations, hidden1=op.get_attr("hidden1"),
        hidden2=op.get_attr("hidden2"), preprocess=op.get_attr("preprocess"),
        preprocess_param=op.get_attr("preprocess_param"), input_gradients=input_gradients,
        matmul_precision=op.get_attr("matmul_precision"))
    if not input_gradients:
        d_grads = [None] * count
    return [d_phi, *d_grads, *d_states, None]  # no gradient to scale


for _op_name, _grad_fn in (("L2lLstmStep", _lstm_step_grad), ("L2lLstmStepMulti", _lstm_step_multi_grad)):
    try:
        tf.RegisterGradient(_op_name)(_grad_fn)
    except KeyError:  # already registered (module reloaded)
        pass
