"""The contract every update rule keeps, run against every registered rule: adding a rule means adding it to
RULES_UNDER_TEST (a test fails when a registered rule is missing from it)."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from l2l_tf import LearnedOptimizer
from l2l_tf.problems import KerasModelFamily
from l2l_tf.rules import (RULES, LSTMUpdateRule, Partitioned, leaf_paths, load_phi, param_specs, rule_from_config,
                          rule_to_config, save_phi)
from l2l_tf.training import MetaTrainer
from lstm_step_numpy import extreme_gradients
from rules_for_tests import NormalizedMomentum

RULES_UNDER_TEST = {
    "lstm": LSTMUpdateRule(4, 3, "paper", output_scale=0.1),
    "lstm_raw": LSTMUpdateRule(3, 2, "none", output_scale=0.5),
    "partitioned": Partitioned({"kernels": LSTMUpdateRule(4, 3, "paper", output_scale=0.1),
                                "other": LSTMUpdateRule(3, 2, "clamped", output_scale=0.05)},
                               assign=[("kernels", "rank>=2")], default="other"),
    "shared_state": NormalizedMomentum(),
}
parametrize_rules = pytest.mark.parametrize("rule", list(RULES_UNDER_TEST.values()), ids=list(RULES_UNDER_TEST))


def model_fn(seed):
    init = lambda k: keras.initializers.RandomNormal(stddev=0.5, seed=int(seed) * 7 + k)
    return keras.Sequential([keras.Input((3,)),
                             keras.layers.Dense(4, activation="tanh", kernel_initializer=init(1),
                                                bias_initializer=init(2)),
                             keras.layers.Dense(1, kernel_initializer=init(3))])


def regression_data(n=64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    return x, (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype(np.float32)


FAMILY = KerasModelFamily(model_fn, regression_data(), "mse", batch_size=16)


def numpy_leaves(tree):
    return [(path, np.asarray(leaf)) for path, leaf in leaf_paths(tree)]


def test_every_registered_rule_is_under_test():
    assert set(RULES) <= {rule.name for rule in RULES_UNDER_TEST.values()}


@parametrize_rules
def test_config_and_phi_file_round_trip(rule, tmp_path):
    assert rule_from_config(json.loads(json.dumps(rule_to_config(rule)))) == rule
    phi = rule.init_phi(3)
    save_phi(tmp_path / "phi.npz", rule, phi, note="contract")
    loaded_rule, loaded_phi, metadata = load_phi(tmp_path / "phi.npz")
    assert loaded_rule == rule and metadata == {"note": "contract"}
    for (p, a), (q, b) in zip(numpy_leaves(phi), numpy_leaves(loaded_phi)):
        assert p == q
        np.testing.assert_array_equal(a, b)


@parametrize_rules
def test_state_structure_and_shapes(rule):
    specs = FAMILY.param_specs()
    assert [s.name for s in specs] == [v.path for v in FAMILY.model.trainable_variables]
    state = rule.init_state(specs)
    assert len(state.per_coordinate) == len(specs)
    for spec, entry in zip(specs, state.per_coordinate):
        for leaf in tf.nest.flatten(entry):
            assert leaf.shape.rank == 2 and leaf.shape[1] == spec.size, (spec, leaf.shape)
    grads = [tf.ones(spec.shape) * 0.1 for spec in specs]
    updates, new_state = rule.step(rule.init_phi(0), grads, state)
    tf.nest.assert_same_structure(state, new_state)
    for old, new in zip(tf.nest.flatten(state), tf.nest.flatten(new_state)):
        assert old.shape == new.shape and old.dtype == new.dtype
    assert [tuple(u.shape) for u in updates] == [spec.shape for spec in specs]


@parametrize_rules
def test_determinism(rule):
    a, b, c = rule.init_phi(5), rule.init_phi(5), rule.init_phi(6)
    for (_, x), (_, y) in zip(numpy_leaves(a), numpy_leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for (_, x), (_, y) in zip(numpy_leaves(a), numpy_leaves(c)))
    specs = param_specs(FAMILY.model.trainable_variables)
    rng = np.random.default_rng(1)
    grads = [tf.constant(rng.standard_normal(spec.shape).astype(np.float32)) for spec in specs]
    runs = [rule.step(a, grads, rule.init_state(specs)) for _ in range(2)]
    for x, y in zip(tf.nest.flatten(runs[0]), tf.nest.flatten(runs[1])):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


@parametrize_rules
def test_finite_updates_on_extreme_gradients(rule):
    """Zeros, ±0, subnormals, ±3e38, the preprocessing kinks and random magnitudes: updates and state stay finite."""
    specs = [s for s in FAMILY.param_specs()] + [param_specs([tf.zeros([40, 3])], ["big/kernel"])[0]]
    rng = np.random.default_rng(2)
    phi, state = rule.init_phi(1), rule.init_state(specs)
    for _ in range(3):
        grads = [tf.constant(extreme_gradients(rng, spec.size).reshape(spec.shape)) for spec in specs]
        updates, state = rule.step(phi, grads, state)
        for value in updates + tf.nest.flatten(state):
            assert np.all(np.isfinite(value.numpy()))


@parametrize_rules
def test_keras_fit_save_load_continue(rule, tmp_path):
    x, y = regression_data()
    model = model_fn(0)
    model.compile(optimizer=LearnedOptimizer(rule=rule, phi=rule.init_phi(2)), loss="mse")
    before = model.get_weights()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert all(np.isfinite(w).all() for w in model.get_weights())
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.optimizer.rule == rule
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert any(np.abs(v.numpy()).max() > 0 for v in model.optimizer.variables[8:])  # the state moved
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights() + [v.numpy() for v in model.optimizer.variables],
                    loaded.get_weights() + [v.numpy() for v in loaded.optimizer.variables]):
        np.testing.assert_array_equal(a, b)


@parametrize_rules
def test_meta_gradient_finite_and_nonzero(rule):
    trainer = MetaTrainer(rule, FAMILY, num_steps=4, unroll_length=4, implementation="reference")
    problem = FAMILY.sample(0)
    phi = tf.nest.map_structure(tf.convert_to_tensor, trainer.phi)
    loss, grad, _ = trainer.meta_gradient(phi, problem.params, problem.extra,
                                          rule.init_state(FAMILY.param_specs()), problem.data, tf.constant(0))
    assert np.isfinite(float(loss))
    leaves = numpy_leaves(grad)
    assert [p for p, _ in leaves] == [p for p, _ in leaf_paths(rule.phi_shapes())]
    assert all(np.all(np.isfinite(g)) for _, g in leaves)
    for top in rule.phi_shapes():  # every part (every group of a partitioned rule) gets a gradient
        assert any(np.abs(g).max() > 0 for p, g in leaves if p.split("/")[0] == top), top
    assert np.isfinite(trainer.train_epoch()) and trainer.skipped_steps == 0  # and a whole epoch applies


@parametrize_rules
def test_implementation_choice(rule):
    """"auto" and "reference" run every rule; "fused" runs the rules the op supports and is an error for others."""
    specs = FAMILY.param_specs()
    grads = [tf.ones(spec.shape) for spec in specs]
    phi, state = rule.init_phi(0), rule.init_state(specs)
    reference, _ = rule.step(phi, grads, state, implementation="reference")
    auto, _ = rule.step(phi, grads, state, implementation="auto")
    for a, b in zip(reference, auto):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    if not rule.supports_fused:
        with pytest.raises(ValueError, match="cannot run"):
            rule.step(phi, grads, state, implementation="fused")
        with pytest.raises(ValueError, match="cannot run"):
            LearnedOptimizer(rule=rule, implementation="fused")
    with pytest.raises(ValueError, match="implementation must be one of"):
        rule.step(phi, grads, state, implementation="cuda")
