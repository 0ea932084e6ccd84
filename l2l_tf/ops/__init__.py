"""The ops layer: one switch between the fused custom op and the pure-TF reference.

    update, new_state = lstm_step(phi, grad, state, scale, config, implementation="auto")

"reference" always works. "fused" uses the compiled op library (csrc/) and raises when it was not built.
"auto" uses the fused op when it is built and the caller is not being compiled by XLA (custom ops have no XLA
kernel), else the reference.
"""
from l2l_tf.ops import fused, reference
from l2l_tf.ops.config import DEFAULT_PREPROCESS_PARAM, PREPROCESS_MODES, StepConfig

IMPLEMENTATIONS = ("auto", "fused", "reference")


def fused_available():
    """True when the compiled op library loaded."""
    return fused.available()


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
        return "fused" if fused.available() and not fused.inside_xla_compilation() else "reference"
    if implementation == "fused" and fused.inside_xla_compilation():
        raise RuntimeError("implementation='fused' cannot run inside an XLA compilation (jit_compile=True): "
                           "the custom op has no XLA kernel. Use implementation='auto' or 'reference'.")
    return implementation


def lstm_step(phi, grad, state, scale, config: StepConfig, implementation="auto"):
    """One coordinatewise LSTM step on a flat gradient: phi [P], grad [N], state [S, N] → (update [N], state)."""
    if resolve_implementation(implementation) == "fused":
        return fused.lstm_step(phi, grad, state, scale, config)
    return reference.lstm_step(phi, grad, state, scale, config)


__all__ = ["StepConfig", "PREPROCESS_MODES", "DEFAULT_PREPROCESS_PARAM", "IMPLEMENTATIONS", "lstm_step",
           "fused_available", "check_implementation", "resolve_implementation"]
