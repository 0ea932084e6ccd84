"""A rule that is not coordinatewise, for the tests of the interface: it reads every coordinate's gradient and keeps
state shared by all of them (the shape GAC and NTM-BFGS rules will have).

    u_i = −exp(φ.log_lr) · m_i,   m_i ← β m_i + g_i / (s + ε),   s ← ρ s + (1 − ρ) mean_j min(|g_j|, 1e6)   (j over ALL tensors)
    with β = sigmoid(φ.momentum_logit); shared state (s, t), per-coordinate state m [1, size].
"""
import numpy as np
import tensorflow as tf

from l2l_tf.rules import RuleState, UpdateRule, param_specs, register_rule


@register_rule("test_normalized_momentum")
class NormalizedMomentum(UpdateRule):
    coordinatewise = False
    supports_fused = False

    def __init__(self, rho=0.9):
        self.rho = float(rho)

    def get_config(self):
        return {"rho": self.rho}

    def phi_shapes(self):
        return {"step": {"log_lr": (1,)}, "momentum": {"logit": (1,)}}

    def init_phi(self, seed=0):
        rng = np.random.default_rng(seed)
        return {"step": {"log_lr": tf.constant([np.log(0.05) + 0.1 * rng.standard_normal()], tf.float32)},
                "momentum": {"logit": tf.constant([0.5 * rng.standard_normal()], tf.float32)}}

    def init_state(self, param_specs_or_params):
        specs = param_specs(param_specs_or_params)
        return RuleState(tuple({"m": tf.zeros([1, spec.size])} for spec in specs),
                         {"scale": tf.ones([]), "t": tf.zeros([])})

    def step(self, phi, grads, state, *, implementation="auto"):
        self.check_implementation(implementation)
        flat = [tf.reshape(tf.cast(g, tf.float32), [1, -1]) for g in grads]
        total = tf.add_n([tf.reduce_sum(tf.minimum(tf.abs(g), 1e6)) for g in flat])  # no overflow to inf
        count = float(sum(int(g.shape[1]) for g in flat))
        scale = self.rho * state.shared["scale"] + (1.0 - self.rho) * total / count
        beta = tf.sigmoid(phi["momentum"]["logit"][0])
        lr = tf.exp(phi["step"]["log_lr"][0])
        updates, per_coordinate = [], []
        for g, grad, entry in zip(flat, grads, state.per_coordinate):
            m = beta * entry["m"] + g / (scale + 1e-8)
            updates.append(tf.cast(tf.reshape(-lr * m, tf.shape(grad)), grad.dtype))
            per_coordinate.append({"m": m})
        return updates, RuleState(tuple(per_coordinate), {"scale": scale, "t": state.shared["t"] + 1.0})
