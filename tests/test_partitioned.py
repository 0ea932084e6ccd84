"""Partitioned: two LSTMs on two groups of tensors give exactly what the two rules give run separately on their
groups (updates, states, per-group meta-gradients, Keras fit); matchers and serialisation."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from l2l_tf import LearnedOptimizer, ops
from l2l_tf.problems import KerasModelFamily
from l2l_tf.rules import (LSTMUpdateRule, ParamSpec, Partitioned, leaf_paths, register_predicate,
                          rule_from_config, rule_to_config)
from l2l_tf.training import MetaTrainer

KERNELS = LSTMUpdateRule(4, 3, "paper", output_scale=0.1)
OTHER = LSTMUpdateRule(3, 2, "clamped", output_scale=0.05)
RULE = Partitioned({"kernels": KERNELS, "other": OTHER}, assign=[("kernels", "rank>=2")], default="other")


def model_fn(seed):
    init = lambda k: keras.initializers.RandomNormal(stddev=0.5, seed=int(seed) * 7 + k)
    return keras.Sequential([keras.Input((3,)),
                             keras.layers.Dense(4, activation="tanh", kernel_initializer=init(1),
                                                bias_initializer=init(2)),
                             keras.layers.Dense(2, kernel_initializer=init(3), bias_initializer=init(4))])


def data(n=64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    return x, np.stack([x @ np.array([1.0, -2.0, 0.5]), np.sin(x[:, 0])], 1).astype(np.float32)


FAMILY = KerasModelFamily(model_fn, data(), "mse", batch_size=16)
KERNEL_INDICES, OTHER_INDICES = [0, 2], [1, 3]  # dense/kernel, dense/bias, dense_1/kernel, dense_1/bias


def random_phi(rule, seed):
    flat = np.random.default_rng(seed).normal(0, 0.4, rule.num_params).astype(np.float32)
    return ops.phi_tree(flat, rule.step_config)


PHI = {"kernels": random_phi(KERNELS, 1), "other": random_phi(OTHER, 2)}


def test_the_paper_split_routes_rank_4_kernels_and_the_rest():
    rule = Partitioned({"conv": LSTMUpdateRule(), "other": LSTMUpdateRule()}, assign=[("conv", "rank>=4")],
                       default="other")
    specs = [ParamSpec("conv2d/kernel", (5, 5, 3, 16)), ParamSpec("conv2d/bias", (16,)),
             ParamSpec("batch_normalization/gamma", (16,)), ParamSpec("dense/kernel", (256, 32))]
    assert rule.groups(specs) == ["conv", "other", "other", "other"]
    assert FAMILY.param_specs()[0].name.endswith("kernel")
    assert RULE.groups(FAMILY.param_specs()) == ["kernels", "other", "kernels", "other"]


def test_matchers_regex_predicates_order_and_errors():
    specs = [ParamSpec("block1/conv/kernel", (3, 3, 1, 2)), ParamSpec("head/dense/kernel", (4, 2)),
             ParamSpec("head/dense/bias", (2,)), ParamSpec("step", ())]
    rule = Partitioned({"a": KERNELS, "b": KERNELS, "c": OTHER},
                       assign=[("b", r"^head/.*kernel$"), ("a", "rank>=2"), ("b", "scalar")], default="c")
    assert rule.groups(specs) == ["a", "b", "c", "b"]  # the first matching matcher wins
    register_predicate("is_bias", lambda spec: spec.name.endswith("/bias"))
    assert Partitioned({"x": KERNELS, "y": OTHER}, assign=[("x", "is_bias")]).groups(specs) == ["y", "y", "x", "y"]
    with pytest.raises(ValueError, match="group 'z' has no rule"):
        Partitioned({"x": KERNELS}, assign=[("z", "rank>=2")])
    with pytest.raises(ValueError, match="neither a named predicate"):
        Partitioned({"x": KERNELS}, assign=[("x", "([unclosed")])
    with pytest.raises(TypeError, match="UpdateRule"):
        Partitioned({"x": "lstm"})
    config = json.loads(json.dumps(rule_to_config(rule)))
    assert config["name"] == "partitioned" and rule_from_config(config) == rule
    assert rule_from_config(config).groups(specs) == rule.groups(specs)


def test_step_equals_the_two_rules_run_separately():
    specs = FAMILY.param_specs()
    rng = np.random.default_rng(3)
    state = RULE.init_state(specs)
    alone = {"kernels": KERNELS.init_state([specs[i] for i in KERNEL_INDICES]),
             "other": OTHER.init_state([specs[i] for i in OTHER_INDICES])}
    for _ in range(3):
        grads = [tf.constant(rng.standard_normal(s.shape).astype(np.float32)) for s in specs]
        updates, state = RULE.step(PHI, grads, state)
        for group, rule, indices in (("kernels", KERNELS, KERNEL_INDICES), ("other", OTHER, OTHER_INDICES)):
            group_updates, alone[group] = rule.step(PHI[group], [grads[i] for i in indices], alone[group])
            for i, u, s in zip(indices, group_updates, alone[group].per_coordinate):
                np.testing.assert_array_equal(updates[i].numpy(), u.numpy())
                assert list(state.per_coordinate[i]) == [group]
                np.testing.assert_array_equal(state.per_coordinate[i][group].numpy(), s.numpy())
    assert state.shared == {"kernels": (), "other": ()}


def test_per_group_meta_gradients_equal_the_two_rules_run_separately():
    """dL/dφ_group through MetaTrainer(Partitioned) equals the gradient of the same unroll written by hand with the
    two rules stepping their own tensors."""
    trainer = MetaTrainer(RULE, FAMILY, num_steps=5, unroll_length=5, implementation="reference")
    problem = FAMILY.sample(4)
    specs = FAMILY.param_specs()
    loss, grad, _ = trainer.meta_gradient(PHI, problem.params, problem.extra, RULE.init_state(specs),
                                          problem.data, tf.constant(0))

    with tf.GradientTape() as tape:
        tape.watch(tf.nest.flatten(PHI))
        params, extra = tuple(problem.params), problem.extra
        states = {"kernels": KERNELS.init_state([specs[i] for i in KERNEL_INDICES]),
                  "other": OTHER.init_state([specs[i] for i in OTHER_INDICES])}
        total = 0.0
        for k in range(5):
            with tf.GradientTape() as inner:
                inner.watch(params)
                f, extra = FAMILY.loss(params, extra, problem.data, k)
            grads = [tf.stop_gradient(g) for g in inner.gradient(f, params)]
            if k > 0:
                total += f
            new = list(params)
            for group, rule, indices in (("kernels", KERNELS, KERNEL_INDICES), ("other", OTHER, OTHER_INDICES)):
                updates, states[group] = rule.step(PHI[group], [grads[i] for i in indices], states[group],
                                                   implementation="reference")
                for i, u in zip(indices, updates):
                    new[i] = params[i] + u
            params = tuple(new)
        total += FAMILY.loss(params, extra, problem.data, 5)[0]
    by_hand = tape.gradient(total, PHI)
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-6)
    for group in ("kernels", "other"):
        for (p, a), (q, b) in zip(leaf_paths(grad[group]), leaf_paths(by_hand[group])):
            assert p == q
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7 * np.abs(b.numpy()).max())
        assert max(np.abs(a.numpy()).max() for _, a in leaf_paths(grad[group])) > 0


@pytest.mark.parametrize("implementation", ["reference", "auto"])
def test_keras_fit_equals_the_two_rules_run_separately(implementation):
    x, y = data()
    model = model_fn(5)
    init = model.get_weights()
    model.compile(optimizer=LearnedOptimizer(rule=RULE, phi=PHI, implementation=implementation), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # 4 steps

    manual = model_fn(5)
    manual.set_weights(init)
    variables = manual.trainable_variables
    states = {"kernels": KERNELS.init_state([variables[i] for i in KERNEL_INDICES]),
              "other": OTHER.init_state([variables[i] for i in OTHER_INDICES])}
    for start in range(0, len(x), 16):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(manual(x[start:start + 16]) - y[start:start + 16]))
        grads = tape.gradient(loss, variables)
        for group, rule, indices in (("kernels", KERNELS, KERNEL_INDICES), ("other", OTHER, OTHER_INDICES)):
            updates, states[group] = rule.step(PHI[group], [grads[i] for i in indices], states[group],
                                               implementation=implementation)
            for i, u in zip(indices, updates):
                variables[i].assign_add(u)
    for got, want in zip(model.get_weights(), manual.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for group, indices in (("kernels", KERNEL_INDICES), ("other", OTHER_INDICES)):
        for i, s in zip(indices, states[group].per_coordinate):
            slot = model.optimizer.state_slot(model.trainable_variables[i])
            np.testing.assert_allclose(slot[group].numpy(), s.numpy(), rtol=1e-5, atol=1e-6)
    names = [v.name for v in model.optimizer.variables]
    assert "phi.kernels.lstm1.w" in names and "phi.other.out.b" in names
