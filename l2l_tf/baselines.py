"""Hand-designed optimizers behind the same functional interface as the learned one.

Keras' own optimizers are variable-based, and `stateless_apply` is not available with the TensorFlow backend, so
the five baselines are restated here as pure (init, update) pairs, with hyperparameters passed as tensors so that
one traced function serves a whole learning-rate grid. tests/test_baselines.py checks each against the Keras
optimizer of the same name step by step.
"""
from typing import Callable, NamedTuple

import tensorflow as tf

from l2l_tf.rules import UpdateRule


class FunctionalOptimizer(NamedTuple):
    """`init(params, specs) -> state`; `update(hparams, grads, state, params) -> (updates, state)`; θ ← θ + updates.

    `specs` are the tensors' ParamSpecs (their paths), which learned rules may route by; the baselines ignore them.
    """

    name: str
    init: Callable
    update: Callable


def _zeros_like(params, specs=None):
    return tuple(tf.zeros_like(p) for p in params)


def sgd():
    return FunctionalOptimizer(
        "sgd", lambda params, specs=None: (),
        lambda hp, grads, state, params: ([-hp["learning_rate"] * g for g in grads], state))


def momentum(beta=0.9, nesterov=False):
    """Heavy-ball (or Nesterov) momentum, in the form Keras' SGD uses: v ← βv − lr g."""

    def update(hp, grads, velocity, params):
        lr = hp["learning_rate"]
        velocity = tuple(beta * v - lr * g for v, g in zip(velocity, grads))
        if nesterov:
            return [beta * v - lr * g for v, g in zip(velocity, grads)], velocity
        return list(velocity), velocity

    return FunctionalOptimizer("nag" if nesterov else "momentum", _zeros_like, update)


def nag(beta=0.9):
    return momentum(beta, nesterov=True)


def rmsprop(rho=0.9, epsilon=1e-7):
    """Keras' RMSprop: s ← ρs + (1−ρ)g²; Δ = −lr g / √(s + ε)."""

    def update(hp, grads, squares, params):
        squares = tuple(rho * s + (1.0 - rho) * tf.square(g) for s, g in zip(squares, grads))
        return [-hp["learning_rate"] * g / tf.sqrt(s + epsilon) for s, g in zip(squares, grads)], squares

    return FunctionalOptimizer("rmsprop", _zeros_like, update)


def adam(beta1=0.9, beta2=0.999, epsilon=1e-7):
    """Keras' Adam: bias-corrected moments, Δ = −lr_t m / (√v + ε)."""

    def init(params, specs=None):
        return (tf.constant(0.0), _zeros_like(params), _zeros_like(params))

    def update(hp, grads, state, params):
        t, m, v = state
        t = t + 1.0
        m = tuple(beta1 * a + (1 - beta1) * g for a, g in zip(m, grads))
        v = tuple(beta2 * b + (1 - beta2) * tf.square(g) for b, g in zip(v, grads))
        lr = hp["learning_rate"] * tf.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        return [-lr * a / (tf.sqrt(b) + epsilon) for a, b in zip(m, v)], (t, m, v)

    return FunctionalOptimizer("adam", init, update)


BASELINES = {"sgd": sgd, "momentum": momentum, "nag": nag, "rmsprop": rmsprop, "adam": adam}

# Learning-rate grid for tuning: half-decades from 1e-4 to 3.
DEFAULT_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


def learned(rule: UpdateRule, implementation="auto", name="lstm"):
    """The learned optimizer as a FunctionalOptimizer; its hparams are {"phi": φ tree}.

    Build it once per rule and reuse it: evaluators trace one function per FunctionalOptimizer.
    """
    rule.check_implementation(implementation)
    return FunctionalOptimizer(
        name, lambda params, specs=None: rule.init_state(params if specs is None else specs),
        lambda hp, grads, state, params: rule.step(hp["phi"], grads, state, implementation=implementation))
