"""Placeholder until the op library is wired in (issue 3)."""


def available():
    return False


def load_error():
    return "the op library is not built"


def inside_xla_compilation():
    return False


def lstm_step(phi, grad, state, scale, config):
    raise RuntimeError(load_error())
