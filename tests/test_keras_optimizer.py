"""Tests of l2l_tf.keras_optimizer.LearnedOptimizer (the learned rule as a Keras 3 optimizer)."""
import json
import pathlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from l2l_tf import LearnedOptimizer, LSTMOptimizerState, LSTMUpdateRule, load_phi, ops, save_phi
from l2l_tf import keras_optimizer as ko
from l2l_tf.ops import fused, reference
from l2l_tf.rules import rule_to_config
from lstm_step_numpy import lstm_step_np
from rules_for_tests import NormalizedMomentum

# A small rule keeps the tests fast; the layout logic is the same as the paper's 20/20.
SMALL = dict(hidden1=4, hidden2=3, preprocess="clamped", preprocess_param=None, output_scale=0.1)
SHIPPED_DIR = ko.PRETRAINED_DIR  # captured before any monkeypatching
QUADRATIC = SHIPPED_DIR / "quadratic.npz"
needs_quadratic = pytest.mark.skipif(not QUADRATIC.exists(),
                                     reason=f"the pretrained quadratic φ is not shipped yet ({QUADRATIC})")
# For tests that mean an untrained φ (phi=None) or a config without φ: the UserWarnings those give are tested below.
untrained_phi_is_meant = pytest.mark.filterwarnings("ignore:LearnedOptimizer. φ is untrained:UserWarning")
fresh_phi_is_meant = pytest.mark.filterwarnings(
    "ignore:LearnedOptimizer.from_config. φ is not part of the config:UserWarning")


def small_rule(**changes):
    return LSTMUpdateRule(**{**SMALL, **changes})


def flat(rule, phi):
    """A φ tree (or a tree of variables) as the flat vector of the kernels' layout, to compare φs."""
    phi = {layer: {part: tf.convert_to_tensor(v) for part, v in parts.items()} for layer, parts in phi.items()}
    return ops.flat_phi(phi, rule.step_config).numpy()


def random_phi(rule, seed):
    """init_phi plus noise on every entry (biases included), so no part of φ is trivially zero; flat (the LSTM
    rule and LearnedOptimizer still take the flat vector of the layout before φ trees)."""
    phi = flat(rule, rule.init_phi(seed))
    return (phi + 0.3 * np.random.default_rng(seed).standard_normal(phi.shape)).astype(np.float32)


def sgd_like_phi():
    """A hand-built φ (hidden 1/1, no preprocessing): update ≈ −0.2·tanh∘tanh(…∇), a bounded descent step.

    Gates (i, f, g, o): input and output gates saturated open (bias 10), forget gate shut (bias −10), cell input
    g = tanh(x). Both layers pass the signal on, the output weight is −0.2: every coordinate moves against its
    gradient (≈ SGD with learning rate 0.2 for small gradients), so the loss of a smooth problem must go down.
    """
    rule = LSTMUpdateRule(hidden1=1, hidden2=1, preprocess="none", output_scale=1.0)
    w1 = np.zeros((4, 2)); w1[2, 0] = 1.0
    w2 = np.zeros((4, 2)); w2[2, 0] = 1.0
    bias = np.array([10.0, -10.0, 0.0, 10.0])
    phi = np.concatenate([w1.ravel(), bias, w2.ravel(), bias, [-0.2], [0.0]]).astype(np.float32)
    rule.check_phi(phi)
    return rule, phi


def regression_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype(np.float32)
    return x, y


def dense_model(seed=0, hidden=4, dtype=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(hidden, activation="tanh", dtype=dtype),
                             keras.layers.Dense(1, dtype=dtype)])


def optimizer_values(optimizer):
    return [v.numpy() for v in optimizer.variables]


# ---------------------------------------------------------------- one step against the functional rule

def test_update_step_equals_rule_step_and_numpy_reference():
    rule = small_rule()
    phi = random_phi(rule, 1)
    opt = LearnedOptimizer(phi=phi, learning_rate=0.5, **SMALL)
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((2, 3)).astype(np.float32)
    w = keras.Variable(w0)
    grads = [rng.standard_normal((2, 3)).astype(np.float32) * s for s in (1.0, 1e-3)]

    state = rule.init_state([tf.constant(w0)])
    expected_w = w0.copy()
    np_state = np.zeros((rule.state_rows, 6))
    for step, g in enumerate(grads):
        opt.apply([tf.constant(g)], [w])
        (update,), state = rule.step(tf.constant(phi), [tf.constant(g)], state)
        expected_w = expected_w + 0.5 * update.numpy()
        np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(opt.state_slot(w).numpy(), state.lstm[0].numpy(), rtol=1e-6, atol=1e-7)
        # Hand check, independent of TensorFlow: the float64 NumPy statement of the step.
        np_phi = {k: {p: v.numpy() for p, v in d.items()} for k, d in rule.as_phi_tree(phi).items()}
        np_update, np_state = lstm_step_np(np_phi, g.ravel(), np_state, 0.1, 4, 3, "clamped", 5.0)
        np.testing.assert_allclose(opt.state_slot(w).numpy(), np_state, rtol=1e-4, atol=1e-6)
        assert np.abs(update.numpy()).max() > 1e-4, "the step must actually move the variable"
    assert int(opt.iterations.numpy()) == 2
    np.testing.assert_array_equal(flat(rule, opt.phi), phi)  # φ is not trained by the optimizer


def test_learning_rate_multiplies_the_update_and_schedules_work():
    rule = small_rule()
    phi = random_phi(rule, 2)
    g = tf.constant([[0.3, -0.2, 1e-4]])
    deltas = {}
    for lr in (1, np.float32(0.25)):
        w = keras.Variable(np.zeros((1, 3), np.float32))
        LearnedOptimizer(phi=phi, learning_rate=lr, **SMALL).apply([g], [w])
        deltas[lr] = w.numpy()
    np.testing.assert_array_equal(deltas[0.25], 0.25 * deltas[1])
    assert np.abs(deltas[1]).min() > 0

    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)
    w = keras.Variable(np.zeros((1, 3), np.float32))
    opt = LearnedOptimizer(phi=phi, learning_rate=schedule, **SMALL)
    opt.apply([g], [w])  # lr(0) = 1
    np.testing.assert_allclose(w.numpy(), deltas[1], rtol=1e-6)
    before = w.numpy()
    opt.apply([g], [w])  # lr(1) = 0.5
    (u1,), state = rule.step(tf.constant(phi), [g], rule.init_state([g]))
    (u2,), _ = rule.step(tf.constant(phi), [g], state)
    np.testing.assert_allclose(w.numpy() - before, 0.5 * u2.numpy(), rtol=1e-5, atol=1e-8)


def test_per_variable_state_is_independent():
    rule = small_rule()
    phi = random_phi(rule, 3)
    rng = np.random.default_rng(1)
    a0, b0 = rng.standard_normal((2, 5)).astype(np.float32)
    ga, gb = rng.standard_normal((2, 3, 5)).astype(np.float32)
    a, b = keras.Variable(a0), keras.Variable(b0)
    both = LearnedOptimizer(phi=phi, **SMALL)
    alone_b = keras.Variable(b0)
    alone = LearnedOptimizer(phi=phi, **SMALL)
    for k in range(3):
        both.apply([tf.constant(ga[k]), tf.constant(gb[k])], [a, b])
        alone.apply([tf.constant(gb[k])], [alone_b])
    sa, sb = both.state_slot(a).numpy(), both.state_slot(b).numpy()
    assert sa.shape == sb.shape == (rule.state_rows, 5)
    assert not np.allclose(sa, sb)
    np.testing.assert_array_equal(sb, alone.state_slot(alone_b).numpy())
    np.testing.assert_array_equal(b.numpy(), alone_b.numpy())
    both.reset_state()
    assert all(np.array_equal(both.state_slot(v).numpy(), np.zeros((rule.state_rows, 5))) for v in (a, b))


def test_none_gradients_are_skipped():
    phi = random_phi(small_rule(), 4)
    opt = LearnedOptimizer(phi=phi, **SMALL)
    a, b = keras.Variable(np.ones(3, np.float32)), keras.Variable(np.ones(2, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.apply([tf.constant([0.1, 0.2, 0.3]), None], [a, b])
    assert not np.allclose(a.numpy(), 1.0)
    np.testing.assert_array_equal(b.numpy(), np.ones(2))
    np.testing.assert_array_equal(opt.state_slot(b).numpy(), 0.0)
    assert np.abs(opt.state_slot(a).numpy()).max() > 0

    # Through fit: a layer weight that never reaches the loss.
    class WithUnused(keras.layers.Layer):
        def build(self, shape):
            self.used = self.add_weight(shape=(shape[-1], 1), initializer="ones")
            self.unused = self.add_weight(shape=(2,), initializer="ones")

        def call(self, x):
            return x @ self.used

    layer = WithUnused()
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile(optimizer=LearnedOptimizer(phi=phi, **SMALL), loss="mse")
    x, y = regression_data(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, epochs=2, verbose=0)
    np.testing.assert_array_equal(layer.unused.numpy(), np.ones(2))
    np.testing.assert_array_equal(model.optimizer.state_slot(layer.unused).numpy(), 0.0)
    assert not np.allclose(layer.used.numpy(), 1.0)


# ---------------------------------------------------------------- fit

def _manual_loop(phi, rule, init_weights, x, y, steps):
    model = dense_model()
    model.set_weights(init_weights)
    state = rule.init_state(model.trainable_variables)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        updates, state = rule.step(tf.constant(phi), grads, state)
        for v, u in zip(model.trainable_variables, updates):
            v.assign_add(u)
    return model, state


def test_fit_equals_manual_loop_with_the_functional_rule():
    rule = small_rule()
    phi = random_phi(rule, 5)
    x, y = regression_data()
    model = dense_model()
    init = model.get_weights()
    opt = LearnedOptimizer(phi=phi, **SMALL)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=len(x), epochs=3, shuffle=False, verbose=0)
    manual, state = _manual_loop(phi, rule, init, x, y, steps=3)
    for got, want in zip(model.get_weights(), manual.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for v, want in zip(model.trainable_variables, state.lstm):
        np.testing.assert_allclose(opt.state_slot(v).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(model.get_weights(), init))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_a_descent_phi_reduces_the_loss(jit_compile):
    rule, phi = sgd_like_phi()
    x, y = regression_data()
    model = dense_model()
    model.compile(optimizer=LearnedOptimizer(phi=phi, **rule.get_config()), loss="mse", jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=len(x), epochs=15, shuffle=False, verbose=0).history["loss"]
    assert history[-1] < 0.1 * history[0], history
    assert all(b < a for a, b in zip(history, history[1:])), history


@pytest.mark.parametrize("implementation", [
    "reference",
    pytest.param("fused", marks=pytest.mark.skipif(not ops.fused_bf16_available(),
                                                   reason="no AVX512_BF16 op library")),
])
def test_matmul_precision_bfloat16_steps_as_the_rule_in_bfloat16(implementation):
    """matmul_precision="bfloat16": each step is the rule's step inside `ops.matmul_precision("bfloat16")` (the
    reference's emulation; the fused kernels agree with it to float32 rounding, tests/test_bf16_matmul.py), which
    differs from the float32 step by a bfloat16-sized amount."""
    rule = LSTMUpdateRule(20, 20, "paper")
    phi = random_phi(rule, 4)
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((30, 40)).astype(np.float32)
    grads = [(rng.standard_normal(w0.shape) * 10.0 ** rng.uniform(-5, 0, w0.shape)).astype(np.float32)
             for _ in range(3)]
    w16, w32 = keras.Variable(w0), keras.Variable(w0)
    opt16 = LearnedOptimizer(phi=phi, rule=rule, implementation=implementation, matmul_precision="bfloat16")
    opt32 = LearnedOptimizer(phi=phi, rule=rule, implementation=implementation)
    state = rule.init_state([tf.constant(w0)])
    expected = w0.astype(np.float64)
    for g in grads:
        opt16.apply([tf.constant(g)], [w16])
        opt32.apply([tf.constant(g)], [w32])
        with ops.matmul_precision("bfloat16"):
            (update,), state = rule.step(tf.constant(phi), [tf.constant(g.ravel())], state,
                                         implementation="reference")
        expected = expected + update.numpy().reshape(w0.shape)
    moved16, moved32 = w16.numpy() - w0, w32.numpy() - w0
    relative = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert relative(moved16, expected - w0) < 2e-4
    assert relative(opt16.state_slot(w16).numpy(), state.lstm[0].numpy()) < 2e-4
    assert 1e-5 < relative(moved16, moved32) < 2e-2  # the rounding is there, and bfloat16-sized


def test_matmul_precision_is_in_the_config_and_a_bfloat16_fit_learns():
    rule, phi = sgd_like_phi()
    opt = LearnedOptimizer(phi=phi, matmul_precision="bfloat16", **rule.get_config())
    config = opt.get_config()
    assert config["matmul_precision"] == "bfloat16"
    with pytest.warns(UserWarning, match="φ is not part of the config"):
        assert LearnedOptimizer.from_config(json.loads(json.dumps(config))).matmul_precision == "bfloat16"
    x, y = regression_data()
    model = dense_model()
    model.compile(optimizer=opt, loss="mse")
    history = model.fit(x, y, batch_size=len(x), epochs=15, shuffle=False, verbose=0).history["loss"]
    assert history[-1] < 0.1 * history[0], history


def test_jit_compile_fit_matches_default_fit():
    rule = small_rule()
    phi = random_phi(rule, 6)
    x, y = regression_data()
    weights, states = [], []
    for jit in (False, True):
        model = dense_model()
        model.compile(optimizer=LearnedOptimizer(phi=phi, **SMALL), loss="mse", jit_compile=jit)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
        states.append([model.optimizer.state_slot(v).numpy() for v in model.trainable_variables])
    for a, b in zip(weights[0] + states[0], weights[1] + states[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_implementation_uses_the_reference_under_xla(monkeypatch):
    """With a (fake) fused op available, "auto" runs it eagerly but never inside jit_compile=True."""
    calls = []

    def fake_fused(phi, grads, states, scale, config, save_activations=False, matmul_precision="float32"):
        # (ops.lstm_steps: all tensors at once)
        assert not save_activations  # only a meta-training unroll keeps activations
        assert matmul_precision == "float32"  # Keras steps are float32
        calls.append(tf.executing_eagerly())
        pairs = [reference.lstm_step(ops.phi_tree(phi, config), g, s, scale, config) for g, s in zip(grads, states)]
        return [u for u, _ in pairs], [s for _, s in pairs]

    monkeypatch.setattr(fused, "available", lambda: True)
    monkeypatch.setattr(fused, "lstm_steps", fake_fused)
    phi = random_phi(small_rule(), 7)
    g = tf.constant([0.5, -0.1, 1e-3])

    eager_w = keras.Variable(np.zeros(3, np.float32))
    LearnedOptimizer(phi=phi, **SMALL).apply([g], [eager_w])
    assert calls == [True]

    xla_w = keras.Variable(np.zeros(3, np.float32))
    opt = LearnedOptimizer(phi=phi, **SMALL)
    opt.build([xla_w])
    tf.function(lambda: opt.apply([g], [xla_w]), jit_compile=True)()
    assert calls == [True], "the fused op must not be traced into an XLA compilation"
    np.testing.assert_allclose(xla_w.numpy(), eager_w.numpy(), rtol=1e-5, atol=1e-7)

    forced = LearnedOptimizer(phi=phi, implementation="fused", **SMALL)
    forced.build([xla_w])
    with pytest.raises(RuntimeError, match="XLA"):
        tf.function(lambda: forced.apply([g], [xla_w]), jit_compile=True)()


def test_keras_optimizer_kwargs_clipnorm_and_weight_decay():
    rule = small_rule()
    phi = random_phi(rule, 8)
    g = np.array([3.0, -4.0], np.float32)  # norm 5
    w = keras.Variable(np.array([1.0, 2.0], np.float32))
    LearnedOptimizer(phi=phi, clipnorm=1.0, weight_decay=0.1, learning_rate=0.5, **SMALL).apply([tf.constant(g)], [w])
    (u,), _ = rule.step(tf.constant(phi), [tf.constant(g / 5.0)], rule.init_state([tf.constant(g)]))
    expected = np.array([1.0, 2.0]) * (1 - 0.1 * 0.5) + 0.5 * u.numpy()
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)

    x, y = regression_data(16)
    model = dense_model()
    model.compile(optimizer=LearnedOptimizer(phi=phi, use_ema=True, gradient_accumulation_steps=2, **SMALL),
                  loss="mse")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert int(model.optimizer.iterations.numpy()) == 2  # 4 batches, one update per 2


# ---------------------------------------------------------------- sparse gradients

def _sparse_reference(phi, rule, steps, vocab, dim):
    """Manual statement of the documented semantics: sum duplicates, step touched rows only."""
    table = np.zeros((vocab, dim), np.float32)
    state = np.zeros((rule.state_rows, vocab * dim), np.float32)
    for indices, values in steps:
        rows = sorted(set(indices))
        summed = np.stack([values[[i for i, r in enumerate(indices) if r == row]].sum(0) for row in rows])
        cols = np.concatenate([np.arange(r * dim, (r + 1) * dim) for r in rows])
        (u,), new = rule.step(tf.constant(phi), [tf.constant(summed.ravel())],
                              LSTMOptimizerState((tf.constant(state[:, cols]),)))
        state[:, cols] = new.lstm[0].numpy()
        table[rows] += u.numpy().reshape(len(rows), dim)
    return table, state


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_indexed_slices_update_only_touched_rows(mode):
    rule = small_rule()
    phi = random_phi(rule, 9)
    vocab, dim = 8, 3
    rng = np.random.default_rng(2)
    steps = [([2, 5, 2], rng.standard_normal((3, dim)).astype(np.float32)),
             ([5, 7], rng.standard_normal((2, dim)).astype(np.float32))]
    table = keras.Variable(np.zeros((vocab, dim), np.float32))
    opt = LearnedOptimizer(phi=phi, **SMALL)
    opt.build([table])
    apply = tf.function(lambda g: opt.apply([g], [table]), jit_compile=(mode == "xla"))
    for indices, values in steps:
        apply(tf.IndexedSlices(tf.constant(values), tf.constant(indices, tf.int32), tf.constant([vocab, dim])))
    want_table, want_state = _sparse_reference(phi, rule, steps, vocab, dim)
    np.testing.assert_allclose(table.numpy(), want_table, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(opt.state_slot(table).numpy(), want_state, rtol=1e-5, atol=1e-7)
    untouched = [0, 1, 3, 4, 6]
    np.testing.assert_array_equal(table.numpy()[untouched], 0.0)
    state = opt.state_slot(table).numpy().reshape(rule.state_rows, vocab, dim)
    np.testing.assert_array_equal(state[:, untouched], 0.0)
    assert np.abs(table.numpy()[[2, 5, 7]]).min() > 0
    assert np.abs(state[:, [2, 5, 7]]).max(axis=0).min() > 0


@pytest.mark.parametrize("jit_compile", [False, True])
def test_embedding_model_fit_leaves_untouched_rows_alone(jit_compile):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,), dtype="int32"), keras.layers.Embedding(8, 3),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    table = model.layers[0].embeddings
    before = table.numpy()
    model.compile(optimizer=LearnedOptimizer(phi=random_phi(small_rule(), 10), **SMALL), loss="mse",
                  jit_compile=jit_compile)
    x = np.array([[1, 2], [2, 3], [3, 1]], np.int32)
    model.fit(x, np.ones((3, 1), np.float32), batch_size=3, epochs=2, verbose=0)
    after = table.numpy()
    state = model.optimizer.state_slot(table).numpy().reshape(-1, 8, 3)
    untouched, touched = [0, 4, 5, 6, 7], [1, 2, 3]
    np.testing.assert_array_equal(after[untouched], before[untouched])
    np.testing.assert_array_equal(state[:, untouched], 0.0)
    assert np.all(np.abs(after[touched] - before[touched]) > 0)
    assert np.all(np.abs(state[:, touched]).max(axis=0) > 0)


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_low_and_high_precision_variables(dtype):
    rule = small_rule()
    phi = random_phi(rule, 11)
    init = np.array([[0.5, -1.0, 2.0]])
    g = np.array([[0.25, -0.5, 0.125]])
    w = keras.Variable(init, dtype=dtype)
    opt = LearnedOptimizer(phi=phi, **SMALL)
    opt.apply([tf.constant(g, dtype)], [w])
    assert keras.backend.standardize_dtype(w.dtype) == dtype
    (u,), state = rule.step(tf.constant(phi), [tf.constant(g, tf.float32)], rule.init_state([tf.constant(g)]))
    expected = tf.constant(init, dtype) + tf.cast(u, dtype)
    np.testing.assert_array_equal(np.asarray(w.numpy(), np.float64), np.asarray(expected.numpy(), np.float64))
    np.testing.assert_allclose(opt.state_slot(w).numpy(), state.lstm[0].numpy(), rtol=1e-6)

    model = dense_model(dtype=dtype)
    model.compile(optimizer=LearnedOptimizer(phi=phi, **SMALL), loss="mse")
    before = [np.asarray(v, np.float64) for v in model.get_weights()]
    x, y = regression_data(8)
    model.fit(x, y, epochs=1, verbose=0)
    for v, b in zip(model.trainable_variables, before):
        assert keras.backend.standardize_dtype(v.dtype) == dtype
        assert np.isfinite(np.asarray(v.numpy(), np.float64)).all() and not np.array_equal(
            np.asarray(v.numpy(), np.float64), b)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float16"])
def test_state_dtype_stores_rounded_float32_state(state_dtype):
    rule = small_rule()
    phi = random_phi(rule, 12)
    w = keras.Variable(np.zeros((2, 2), np.float32))
    opt = LearnedOptimizer(phi=phi, state_dtype=state_dtype, **SMALL)
    gs = [tf.constant([[0.1, -0.2], [0.3, 1e-3]]), tf.constant([[-0.1, 0.2], [0.0, 2.0]])]
    state = rule.init_state([w])
    expected_w = np.zeros((2, 2), np.float32)
    for g in gs:
        opt.apply([g], [w])
        rounded = LSTMOptimizerState(tuple(tf.cast(tf.cast(s, state_dtype), tf.float32) for s in state.lstm))
        (u,), state = rule.step(tf.constant(phi), [g], rounded)
        expected_w += u.numpy()
    slot = opt.state_slot(w)
    assert keras.backend.standardize_dtype(slot.dtype) == state_dtype
    np.testing.assert_array_equal(np.asarray(slot.numpy(), np.float32),
                                  tf.cast(tf.cast(state.lstm[0], state_dtype), tf.float32).numpy())
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-6)
    assert opt.get_config()["state_dtype"] == state_dtype


def test_mixed_precision_with_loss_scale_optimizer(tmp_path):
    phi = random_phi(small_rule(), 13)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = dense_model()
        model.compile(optimizer=LearnedOptimizer(phi=phi, **SMALL), loss="mse")
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        inner = model.optimizer.inner_optimizer
        assert isinstance(inner, LearnedOptimizer)
        before = model.get_weights()
        x, y = regression_data(16)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    after = model.get_weights()
    assert all(np.isfinite(a).all() for a in after)
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))
    assert all(np.abs(inner.state_slot(v).numpy()).max() > 0 for v in model.trainable_variables)

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model.save(tmp_path / "mixed.keras")
        loaded = keras.models.load_model(tmp_path / "mixed.keras")
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert isinstance(loaded.optimizer.inner_optimizer, LearnedOptimizer)
    for a, b in zip(optimizer_values(model.optimizer), optimizer_values(loaded.optimizer)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- saving and config

def test_keras_save_load_restores_phi_and_state_and_continues_identically(tmp_path):
    rule = small_rule()
    phi = random_phi(rule, 14)  # not init_phi(phi_seed): a lost φ would show
    x, y = regression_data()
    model = dense_model()
    model.compile(optimizer=LearnedOptimizer(phi=phi, learning_rate=0.7, **SMALL), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)

    assert isinstance(loaded.optimizer, LearnedOptimizer)
    assert loaded.optimizer.rule == model.optimizer.rule
    # iterations, learning_rate, skipped_steps, the 6 φ leaves, one LSTM state slot per variable
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables) == 9 + len(model.trainable_variables)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(flat(rule, loaded.optimizer.phi), phi)
    for v, lv in zip(model.trainable_variables, loaded.trainable_variables):
        slot = model.optimizer.state_slot(v).numpy()
        assert np.abs(slot).max() > 0
        np.testing.assert_array_equal(loaded.optimizer.state_slot(lv).numpy(), slot)

    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(optimizer_values(model.optimizer), optimizer_values(loaded.optimizer)):
        np.testing.assert_array_equal(a, b)


def test_save_before_training_keeps_phi(tmp_path):
    phi = random_phi(small_rule(), 15)
    model = dense_model()
    model.compile(optimizer=LearnedOptimizer(phi=phi, **SMALL), loss="mse")
    model.save(tmp_path / "untrained.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = keras.models.load_model(tmp_path / "untrained.keras")
    np.testing.assert_array_equal(flat(small_rule(), loaded.optimizer.phi), phi)
    x, y = regression_data(8)
    loaded.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_array_equal(flat(small_rule(), loaded.optimizer.phi), phi)


@untrained_phi_is_meant
def test_state_saved_built_restores_into_an_unbuilt_optimizer():
    """load_own_variables before build (a model built only later): φ at once, the state slots at build."""
    phi = random_phi(small_rule(), 18)
    w = keras.Variable(np.zeros((2, 3), np.float32))
    opt = LearnedOptimizer(phi=phi, **SMALL)
    opt.apply([tf.constant(np.full((2, 3), 0.1, np.float32))], [w])
    store = {}
    opt.save_own_variables(store)

    fresh = LearnedOptimizer(**SMALL)
    fresh.load_own_variables(store)
    np.testing.assert_array_equal(flat(small_rule(), fresh.phi), phi)
    w2 = keras.Variable(w.numpy())
    fresh.build([w2])
    for a, b in zip(optimizer_values(opt), optimizer_values(fresh)):
        np.testing.assert_array_equal(a, b)
    assert np.abs(fresh.state_slot(w2).numpy()).max() > 0


@untrained_phi_is_meant
def test_tf_train_checkpoint_round_trip(tmp_path):
    phi = random_phi(small_rule(), 19)
    x, y = regression_data(16)
    model = dense_model()
    model.compile(optimizer=LearnedOptimizer(phi=phi, **SMALL), loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    other = dense_model(seed=5)
    other_opt = LearnedOptimizer(**SMALL)
    other.compile(optimizer=other_opt, loss="mse")
    tf.train.Checkpoint(model=other, optimizer=other_opt).restore(path)
    other_opt.build(other.trainable_variables)  # slots created after the restore call get their saved values
    for a, b in zip(optimizer_values(model.optimizer), optimizer_values(other_opt)):
        np.testing.assert_array_equal(a, b)


@untrained_phi_is_meant
def test_get_config_from_config_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=10, decay_rate=0.9)
    opt = LearnedOptimizer(hidden1=5, hidden2=6, preprocess="paper", preprocess_param=7.0, output_scale=0.01,
                           learning_rate=schedule, state_dtype="bfloat16", implementation="reference",
                           phi_seed=3, clipnorm=2.0, name="lopt")
    config = opt.get_config()
    assert {k: config[k] for k in ("rule", "state_dtype", "implementation", "phi_seed", "clipnorm", "name")} == {
        "rule": {"name": "lstm", "config": {"hidden1": 5, "hidden2": 6, "preprocess": "paper", "preprocess_param": 7.0,
                                            "output_scale": 0.01}},
        "state_dtype": "bfloat16", "implementation": "reference", "phi_seed": 3, "clipnorm": 2.0, "name": "lopt"}
    assert "phi" not in config
    with pytest.warns(UserWarning, match="φ is not part of the config"):
        clone = LearnedOptimizer.from_config(json.loads(json.dumps(config)))  # JSON-able, and a copy
    assert clone.get_config() == config
    assert clone.rule == opt.rule
    np.testing.assert_array_equal(flat(opt.rule, clone.phi), flat(opt.rule, opt.phi))  # same phi_seed: same φ

    serialized = keras.optimizers.serialize(opt)
    assert serialized["registered_name"] == "l2l_tf>LearnedOptimizer"
    with pytest.warns(UserWarning, match="φ is not part of the config"):
        restored = keras.optimizers.deserialize(json.loads(json.dumps(serialized)))
    assert isinstance(restored, LearnedOptimizer) and restored.get_config() == config


# ---------------------------------------------------------------- φ files and pretrained

def test_phi_from_file_and_from_file_config(tmp_path):
    rule = LSTMUpdateRule(hidden1=3, hidden2=2, preprocess="none", output_scale=1.0)
    phi = random_phi(rule, 16)
    path = tmp_path / "phi.npz"
    save_phi(str(path), rule, phi, steps=100)

    opt = LearnedOptimizer.from_file(path, learning_rate=0.5)
    assert opt.rule == rule
    np.testing.assert_array_equal(flat(rule, opt.phi), phi)
    assert opt.phi_metadata == {"steps": 100}

    same = LearnedOptimizer(phi=str(path), hidden1=3, hidden2=2, preprocess="none", output_scale=1.0)
    np.testing.assert_array_equal(flat(rule, same.phi), phi)

    with pytest.raises(ValueError, match="does not match.*preprocess='none' in the file vs 'paper' given"):
        LearnedOptimizer(phi=path, hidden1=3, hidden2=2)
    with pytest.raises(ValueError, match="output_scale=1.0 in the file vs 0.5 given"):
        LearnedOptimizer.from_file(path, output_scale=0.5)


def test_from_pretrained_with_a_temporary_directory(tmp_path, monkeypatch):
    rule = LSTMUpdateRule(hidden1=2, hidden2=2, preprocess="none", output_scale=1.0)
    phi = random_phi(rule, 17)
    save_phi(str(tmp_path / "toy.npz"), rule, phi)
    monkeypatch.setattr(ko, "PRETRAINED_DIR", tmp_path)
    assert ko.available_pretrained() == ["toy"]
    opt = LearnedOptimizer.from_pretrained("toy", learning_rate=0.5, state_dtype="bfloat16")
    np.testing.assert_array_equal(flat(rule, opt.phi), phi)
    assert opt.rule.hidden1 == 2 and opt.rule.preprocess == "none" and opt.state_dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"unknown pretrained optimizer 'nope'.*available: 'toy'"):
        LearnedOptimizer.from_pretrained("nope")
    with pytest.raises(ValueError, match="unknown pretrained optimizer"):
        LearnedOptimizer.from_pretrained("../toy")


def test_from_pretrained_unknown_name_lists_available():
    with pytest.raises(ValueError, match="unknown pretrained optimizer 'no-such-optimizer'; available: ") as info:
        LearnedOptimizer.from_pretrained("no-such-optimizer")
    for name in ko.available_pretrained():
        assert repr(name) in str(info.value)


# ---------------------------------------------------------------- clear errors

def _write_bad_files(directory):
    rule = LSTMUpdateRule(hidden1=2, hidden2=2, preprocess="none", output_scale=1.0)
    good = flat(rule, rule.init_phi(0))
    (directory / "text.npz").write_text("not an archive")
    np.save(directory / "array.npy", good)
    np.savez(directory / "wrong_keys.npz", weights=good)
    nan = good.copy()
    nan[3] = np.nan
    np.savez(directory / "nonfinite.npz", phi=nan, config=json.dumps(rule.get_config()))
    np.savez(directory / "short.npz", phi=good[:-1], config=json.dumps(rule.get_config()))


@pytest.mark.parametrize("name, error, match", [
    ("missing.npz", FileNotFoundError, "no φ file"),
    ("text.npz", ValueError, "text.npz"),
    ("array.npy", ValueError, "array.npy' is not a φ file"),
    ("wrong_keys.npz", ValueError, r"not a φ file: missing \['config', 'phi'\]"),
    ("nonfinite.npz", ValueError, "non-finite"),
    ("short.npz", ValueError, r"flat vector of 75\), got a tensor of shape \(74,\)"),
    (".", ValueError, "is a directory"),
])
def test_bad_phi_files(tmp_path, name, error, match):
    _write_bad_files(tmp_path)
    with pytest.raises(error, match=match):
        LearnedOptimizer.from_file(tmp_path / name)
    with pytest.raises(error, match=match):
        LearnedOptimizer(phi=str(tmp_path / name))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(phi=np.zeros(10, np.float32)), ValueError, r"a flat vector of 5141\), got a tensor of shape \(10,\)"),
    (dict(phi=np.zeros((5141, 1), np.float32)), ValueError, r"got a tensor of shape \(5141, 1\)"),
    (dict(phi={"lstm1": {"w": np.zeros((80, 22), np.float32)}}), ValueError, r"phi: missing leaves \['lstm2', 'out'\]"),
    (dict(phi=np.full(5141, np.inf, np.float32)), ValueError, "non-finite"),
    (dict(phi=np.zeros(5141, np.int32)), ValueError, "floating-point"),
    (dict(phi=3.0), TypeError, "phi must be None, a path"),
    (dict(state_dtype="int8"), ValueError, "state_dtype must be one of"),
    (dict(state_dtype="float64"), ValueError, "state_dtype must be one of"),
    (dict(hidden1=0), ValueError, "hidden1 must be a positive int"),
    (dict(preprocess="log"), ValueError, "preprocess must be one of"),
    (dict(implementation="cuda"), ValueError, "implementation must be one of"),
    (dict(matmul_precision="float16"), ValueError, "matmul_precision must be one of"),
    (dict(bogus=1), ValueError, "not recognized"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LearnedOptimizer(**kwargs)


def test_fused_without_the_op_library_is_a_clear_error():
    if fused.available():
        pytest.skip("the op library is built here")
    with pytest.raises(RuntimeError, match="implementation='fused'.*not available"):
        LearnedOptimizer(implementation="fused")


@untrained_phi_is_meant
@pytest.mark.parametrize("variable", [
    lambda: tf.Variable([1, 2], dtype=tf.int32, name="counts"),
    lambda: tf.Variable([1 + 2j], dtype=tf.complex64, name="phases"),
])
def test_non_floating_variables_are_rejected(variable):
    opt = LearnedOptimizer(**SMALL)
    with pytest.raises(TypeError, match="floating-point variables.*has dtype (int32|complex64)"):
        opt.build([variable()])


@untrained_phi_is_meant
def test_non_floating_gradient_is_rejected():
    opt = LearnedOptimizer(**SMALL)
    w = keras.Variable(np.zeros(2, np.float32))
    opt.build([w])
    with pytest.raises(TypeError, match="floating-point gradients; got int32"):
        opt.apply([tf.constant([1, 2], tf.int32)], [w])


# ---------------------------------------------------------------- the shipped quadratic φ

class _Quadratics(keras.layers.Layer):
    """θ [B, d] of a batch of least-squares problems f_b = ‖W_b θ_b − y_b‖²; outputs f_b (input ignored)."""

    def __init__(self, w, y, **kwargs):
        super().__init__(**kwargs)
        self.w, self.y = tf.constant(w, tf.float32), tf.constant(y, tf.float32)

    def build(self, shape):
        self.theta = self.add_weight(shape=tuple(self.y.shape),
                                     initializer=keras.initializers.RandomNormal(stddev=0.01, seed=1))

    def call(self, x):
        residual = tf.linalg.matvec(self.w, self.theta) - self.y
        return tf.reduce_sum(tf.square(residual), axis=-1)[None, :] + 0.0 * tf.reduce_sum(x)


@needs_quadratic
def test_shipped_quadratic_phi_minimises_quadratics():
    opt = LearnedOptimizer.from_pretrained("quadratic")
    assert opt.rule.preprocess == "none"
    distribution = opt.phi_metadata.get("distribution", "gaussian")
    rng = np.random.default_rng(1234)
    shape_w, shape_y = (128, 10, 10), (128, 10)
    if distribution == "uniform":
        w, y = rng.uniform(size=shape_w), rng.uniform(size=shape_y)
    else:
        w, y = rng.standard_normal(shape_w), rng.standard_normal(shape_y)
    model = keras.Sequential([keras.Input((1,)), _Quadratics(w, y)])
    model.compile(optimizer=opt, loss=lambda y_true, y_pred: y_pred)  # mean over the 128 functions
    steps = 100
    history = model.fit(np.zeros((steps, 1), np.float32), np.zeros((steps, 1), np.float32), batch_size=1,
                        epochs=1, shuffle=False, verbose=0)
    final = float(model.evaluate(np.zeros((1, 1)), np.zeros((1, 1)), verbose=0))
    initial = float(np.mean(np.sum(np.square(np.einsum("bij,bj->bi", w, np.zeros(shape_y)) - y), -1)))
    assert np.isfinite(history.history["loss"][0])
    assert final < 0.5 * initial, (final, initial)


@needs_quadratic
def test_readme_scenario_fit_save_load_continue(tmp_path):
    x, y = regression_data()
    model = dense_model()
    model.compile(optimizer=LearnedOptimizer.from_pretrained("quadratic"), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    model.save(tmp_path / "readme.keras")
    loaded = keras.models.load_model(tmp_path / "readme.keras")
    for a, b in zip(optimizer_values(model.optimizer), optimizer_values(loaded.optimizer)):
        np.testing.assert_array_equal(a, b)
    _, shipped_phi, _ = load_phi(QUADRATIC)
    rule = loaded.optimizer.rule
    np.testing.assert_array_equal(flat(rule, loaded.optimizer.phi), flat(rule, shipped_phi))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights() + optimizer_values(model.optimizer),
                    loaded.get_weights() + optimizer_values(loaded.optimizer)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- files written before rules/, run-time choices

LEGACY = pathlib.Path(__file__).parent / "fixtures" / "legacy"


def _legacy_data():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    return x, (x @ np.array([[1.0], [-2.0], [0.5], [0.0]], np.float32)).astype(np.float32)


def test_keras_file_written_before_rules_loads_and_continues_like_the_old_code():
    """optimizer.keras was saved by the flat-φ code (one φ variable, a config with the LSTM's arguments at the
    top level, implementation="fused"); loaded here it continues exactly as the old code did (fixture)."""
    if not fused.available():
        pytest.skip("the fixture continues with the fused op")
    model = keras.models.load_model(LEGACY / "optimizer.keras")
    opt = model.optimizer
    assert opt.rule == LSTMUpdateRule(20, 20, "paper", output_scale=0.1)
    _, shipped, _ = load_phi(ko.PRETRAINED_DIR / "mnist.npz")
    np.testing.assert_array_equal(flat(opt.rule, opt.phi), flat(opt.rule, shipped))
    x, y = _legacy_data()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    expected = np.load(LEGACY / "keras_continued.npz")
    for i, w in enumerate(model.get_weights()):
        np.testing.assert_allclose(w, expected[f"weight{i}"], rtol=1e-6, atol=1e-7)
    for i, v in enumerate(model.trainable_variables):
        np.testing.assert_allclose(opt.state_slot(v).numpy(), expected[f"slot{i}"], rtol=1e-6, atol=1e-7)
    assert int(opt.iterations.numpy()) == int(expected["iterations"])


def test_a_file_saved_with_fused_loads_as_auto_where_the_op_is_missing(monkeypatch):
    monkeypatch.setattr(fused, "available", lambda: False)
    monkeypatch.setattr(fused, "load_error", lambda: "simulated: not built")
    with pytest.warns(UserWarning, match="implementation='fused'.*simulated: not built.*'auto'"):
        model = keras.models.load_model(LEGACY / "optimizer.keras")
    assert model.optimizer.implementation == "auto"
    x, y = _legacy_data()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # runs the pure-TF step
    expected = np.load(LEGACY / "keras_continued.npz")
    for i, w in enumerate(model.get_weights()):
        np.testing.assert_allclose(w, expected[f"weight{i}"], rtol=1e-4, atol=1e-6)


@untrained_phi_is_meant
@fresh_phi_is_meant
def test_implementation_is_the_optimizers_not_the_rules():
    opt = LearnedOptimizer(implementation="reference", **SMALL)
    config = opt.get_config()
    assert config["implementation"] == "reference"
    assert "implementation" not in json.dumps(config["rule"])
    assert LearnedOptimizer.from_config({**config, "implementation": "auto"}).rule == opt.rule


@untrained_phi_is_meant
def test_rule_argument_and_lstm_arguments():
    rule = small_rule()
    assert LearnedOptimizer(rule=rule).rule == rule
    assert LearnedOptimizer(rule=rule_to_config(rule)).rule == rule
    assert LearnedOptimizer(rule=rule, hidden1=4).rule == rule  # equal values may be repeated
    with pytest.raises(ValueError, match="hidden1=4 in rule vs 5 given"):
        LearnedOptimizer(rule=rule, hidden1=5)
    with pytest.raises(ValueError, match="configure the plain LSTM rule"):
        LearnedOptimizer(rule=NormalizedMomentum(), output_scale=0.1)
    with pytest.raises(TypeError, match="rule must be an UpdateRule"):
        LearnedOptimizer(rule="lstm")


def test_a_rule_with_shared_state_steps_all_variables_at_once():
    """A rule that is not coordinatewise gets every variable's gradient in one step (its update of one variable
    depends on the others'), its shared state lives in optimizer variables, and sparse gradients are densified."""
    rule = NormalizedMomentum()
    phi = rule.init_phi(0)
    a, b = keras.Variable(np.zeros(3, np.float32)), keras.Variable(np.zeros((2, 2), np.float32))
    opt = LearnedOptimizer(rule=rule, phi=phi)
    ga, gb = tf.constant([1.0, -2.0, 3.0]), tf.constant([[0.5, 0.5], [0.5, 0.5]])
    opt.apply([ga, gb], [a, b])
    updates, state = rule.step(phi, [ga, gb], rule.init_state([a, b]))
    np.testing.assert_allclose(a.numpy(), updates[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), updates[1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(opt.shared_state["scale"].numpy(), state.shared["scale"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(opt.state_slot(b)["m"].numpy(), state.per_coordinate[1]["m"].numpy(), rtol=1e-6)
    alone = keras.Variable(np.zeros(3, np.float32))
    LearnedOptimizer(rule=rule, phi=phi).apply([ga], [alone])
    assert not np.allclose(alone.numpy(), a.numpy())  # b's gradient changed a's update: not coordinatewise

    model = keras.Sequential([keras.Input((2,), dtype="int32"), keras.layers.Embedding(10, 3),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(optimizer=LearnedOptimizer(rule=rule, phi=phi), loss="mse")
    ids = np.random.default_rng(0).integers(0, 10, (16, 2))
    model.fit(ids, np.ones((16, 1), np.float32), batch_size=8, epochs=1, verbose=0)
    assert float(model.optimizer.shared_state["t"].numpy()) == 2.0


# ---------------------------------------------------------------- non-finite gradients: the step is skipped

NONFINITE_KWARGS = [
    dict(),
    dict(clipnorm=1.0, weight_decay=0.1, use_ema=True, learning_rate=0.5),
    dict(global_clipnorm=1.0, use_ema=True, ema_overwrite_frequency=1),
    dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.5)),
]


def _skip_case(kwargs, rule=None, phi_seed=20):
    rule = rule or small_rule()
    phi = random_phi(rule, phi_seed) if isinstance(rule, LSTMUpdateRule) else rule.init_phi(phi_seed)
    variables = [keras.Variable(np.full((2, 3), 0.5, np.float32)), keras.Variable(np.array([1.0, -1.0], np.float32))]
    optimizer = LearnedOptimizer(phi=phi, rule=rule, **kwargs)
    return optimizer, variables


def _values_but_skipped(optimizer):
    return [v.numpy() for v in optimizer.variables if v is not optimizer.skipped_steps]


@pytest.mark.parametrize("kwargs", NONFINITE_KWARGS, ids=["plain", "clipnorm_wd_ema", "global_clip_ema_overwrite",
                                                          "schedule"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nonfinite_gradient_skips_the_whole_step(kwargs, bad):
    """One NaN/Inf anywhere: no variable, no state slot, no EMA and no step counter changes; `skipped_steps` counts
    it; the next steps are exactly those of an optimizer that never saw the bad step."""
    rng = np.random.default_rng(3)
    good = [[tf.constant(rng.standard_normal(s).astype(np.float32)) for s in ((2, 3), (2,))] for _ in range(2)]
    poisoned = [good[0][0], tf.tensor_scatter_nd_update(good[0][1], [[1]], [bad])]  # one coordinate of one tensor

    optimizer, variables = _skip_case(kwargs)
    reference, reference_variables = _skip_case(kwargs)
    optimizer.apply(good[0], variables)
    reference.apply(good[0], reference_variables)
    before = [v.numpy() for v in variables] + optimizer_values(optimizer)
    optimizer.apply(poisoned, variables)
    after = [v.numpy() for v in variables] + optimizer_values(optimizer)
    for a, b in zip(before, after):
        if b.shape == () and b.dtype.kind == "i" and a == b - 1:
            continue  # the skipped_steps counter
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.skipped_steps.numpy()) == 1
    assert int(optimizer.iterations.numpy()) == 1
    assert all(np.isfinite(v.numpy()).all() for v in variables + optimizer.variables)

    optimizer.apply(good[1], variables)
    reference.apply(good[1], reference_variables)
    for a, b in zip(variables, reference_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(_values_but_skipped(optimizer), _values_but_skipped(reference)):
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.iterations.numpy()) == 2 and int(reference.skipped_steps.numpy()) == 0


def test_nonfinite_sparse_and_shared_state_steps_are_skipped():
    """Sparse gradients (values checked) and a rule with shared state: nothing moves."""
    table = keras.Variable(np.zeros((6, 2), np.float32))
    optimizer = LearnedOptimizer(phi=random_phi(small_rule(), 21), **SMALL)
    optimizer.build([table])
    apply = tf.function(lambda g: optimizer.apply([g], [table]))
    apply(tf.IndexedSlices(tf.constant([[0.1, 0.2]]), tf.constant([1]), tf.constant([6, 2])))
    before = [table.numpy()] + optimizer_values(optimizer)
    apply(tf.IndexedSlices(tf.constant([[np.nan, 0.2]]), tf.constant([3]), tf.constant([6, 2])))
    for a, b in zip(before, [table.numpy()] + optimizer_values(optimizer)):
        if a.shape == () and a.dtype.kind == "i" and b == a + 1:
            continue
        np.testing.assert_array_equal(a, b)
    assert int(optimizer.skipped_steps.numpy()) == 1 and int(optimizer.iterations.numpy()) == 1

    shared, variables = _skip_case({}, rule=NormalizedMomentum())
    shared.apply([tf.ones((2, 3)), tf.ones(2)], variables)
    before = [v.numpy() for v in variables] + _values_but_skipped(shared)
    shared.apply([tf.ones((2, 3)), tf.constant([np.inf, 1.0])], variables)
    for a, b in zip(before, [v.numpy() for v in variables] + _values_but_skipped(shared)):
        np.testing.assert_array_equal(a, b)
    assert float(shared.shared_state["t"].numpy()) == 1.0 and int(shared.skipped_steps.numpy()) == 1


def _batches_with_a_nan_batch():
    x, y = regression_data(32)
    bad = x.copy()
    bad[8:16] = np.nan  # the second batch of 8
    clean = np.concatenate([x[:8], x[16:]]), np.concatenate([y[:8], y[16:]])
    return (bad, y), clean


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_with_a_nan_batch_equals_fit_without_it(jit_compile):
    """The issue's scenario: one batch of NaN inputs. The weights and every state slot stay finite, and training
    continues exactly as if the batch had not been there (the step counter did not advance either)."""
    (bad_x, bad_y), (clean_x, clean_y) = _batches_with_a_nan_batch()
    phi = random_phi(small_rule(), 22)
    runs = []
    for x, y in ((bad_x, bad_y), (clean_x, clean_y)):
        model = dense_model()
        model.compile(optimizer=LearnedOptimizer(phi=phi, **SMALL), loss="mse", jit_compile=jit_compile)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        runs.append(model)
    poisoned, clean = runs
    assert int(poisoned.optimizer.skipped_steps.numpy()) == 2  # once per epoch
    assert int(clean.optimizer.skipped_steps.numpy()) == 0
    assert int(poisoned.optimizer.iterations.numpy()) == int(clean.optimizer.iterations.numpy()) == 6
    for a, b in zip(poisoned.get_weights(), clean.get_weights()):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for v, w in zip(poisoned.trainable_variables, clean.trainable_variables):
        slot = poisoned.optimizer.state_slot(v).numpy()
        assert np.isfinite(slot).all() and np.abs(slot).max() > 0
        np.testing.assert_allclose(slot, clean.optimizer.state_slot(w).numpy(), rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_drops_a_nonfinite_micro_batch():
    """With gradient_accumulation_steps=N a micro-batch with a NaN is dropped whole: the accumulators stay clean and
    it does not count toward the N, so the accumulated step averages N finite micro-batches."""
    rng = np.random.default_rng(4)
    good = [[tf.constant(rng.standard_normal(s).astype(np.float32)) for s in ((2, 3), (2,))] for _ in range(4)]
    nan = [good[0][0], tf.constant([np.nan, 0.0])]
    optimizer, variables = _skip_case(dict(gradient_accumulation_steps=2, use_ema=True))
    reference, reference_variables = _skip_case(dict(gradient_accumulation_steps=2, use_ema=True))
    for g in (good[0], nan, good[1], nan, nan, good[2], good[3]):
        optimizer.apply(g, variables)
    for g in good:
        reference.apply(g, reference_variables)
    assert int(optimizer.skipped_steps.numpy()) == 3
    assert int(optimizer.iterations.numpy()) == 2  # two accumulated steps
    for a, b in zip(variables, reference_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(_values_but_skipped(optimizer), _values_but_skipped(reference)):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


@untrained_phi_is_meant
@fresh_phi_is_meant
def test_skip_nonfinite_false_applies_the_step_as_before():
    optimizer, variables = _skip_case(dict(skip_nonfinite=False))
    optimizer.apply([tf.ones((2, 3)), tf.constant([np.nan, 0.0])], variables)
    assert int(optimizer.iterations.numpy()) == 1 and int(optimizer.skipped_steps.numpy()) == 0
    assert np.isnan(variables[1].numpy()[0]) and np.isnan(optimizer.state_slot(variables[1]).numpy()).any()
    config = optimizer.get_config()
    assert config["skip_nonfinite"] is False
    assert LearnedOptimizer.from_config(config).skip_nonfinite is False
    assert LearnedOptimizer(**SMALL).get_config()["skip_nonfinite"] is True


def test_loss_scale_optimizer_skips_first_and_the_inner_does_not_count():
    """mixed_float16: LossScaleOptimizer skips a non-finite step itself (and halves its scale); the inner
    LearnedOptimizer only ever sees finite gradients, so it neither counts the step nor changes anything."""
    (bad_x, bad_y), _ = _batches_with_a_nan_batch()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = dense_model()
        model.compile(optimizer=LearnedOptimizer(phi=random_phi(small_rule(), 23), **SMALL), loss="mse")
        outer = model.optimizer
        assert isinstance(outer, keras.optimizers.LossScaleOptimizer)
        model.fit(bad_x, bad_y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    inner = outer.inner_optimizer
    outer_skips = round(np.log2(outer.initial_scale / float(outer.dynamic_scale.numpy())))
    assert outer_skips >= 1
    assert int(inner.skipped_steps.numpy()) == 0
    assert int(inner.iterations.numpy()) + outer_skips == 4
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert all(np.isfinite(inner.state_slot(v).numpy()).all() for v in model.trainable_variables)


def test_skipped_steps_is_saved_and_files_of_the_previous_layout_load(tmp_path):
    """skipped_steps travels in .keras files; a store written before it existed (no such variable: everything after
    the learning rate one position earlier) still loads, built or not, with the counter at zero."""
    (bad_x, bad_y), _ = _batches_with_a_nan_batch()
    model = dense_model()
    model.compile(optimizer=LearnedOptimizer(phi=random_phi(small_rule(), 24), **SMALL), loss="mse")
    model.fit(bad_x, bad_y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "skipped.keras")
    loaded = keras.models.load_model(tmp_path / "skipped.keras")
    assert int(loaded.optimizer.skipped_steps.numpy()) == 1
    for a, b in zip(optimizer_values(model.optimizer), optimizer_values(loaded.optimizer)):
        np.testing.assert_array_equal(a, b)

    schedule = keras.optimizers.schedules.ExponentialDecay(1.0, decay_steps=1, decay_rate=0.9)
    for learning_rate, position in ((0.7, 2), (schedule, 1)):  # iteration, [learning_rate], skipped_steps, φ...
        opt, variables = _skip_case(dict(learning_rate=learning_rate), phi_seed=24)
        opt.apply([tf.ones((2, 3)), tf.constant([np.nan, 1.0])], variables)
        opt.apply([tf.ones((2, 3)), tf.constant([0.5, 1.0])], variables)
        store = {}
        opt.save_own_variables(store)
        assert [i for i, v in enumerate(opt.variables) if v is opt.skipped_steps] == [position]
        old = [store[str(i)] for i in range(len(store)) if i != position]
        for old_store in ({str(i): value for i, value in enumerate(old)},  # saved built
                          {str(i): value for i, value in enumerate(old[:opt._num_unbuilt_variables - 1])}):  # unbuilt
            for build_first in (True, False):
                fresh, _ = _skip_case(dict(learning_rate=learning_rate), phi_seed=0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "saved before it was built"
                    if build_first:
                        fresh.build(variables)
                    fresh.load_own_variables(old_store)
                    if not build_first:
                        fresh.build(variables)
                assert int(fresh.skipped_steps.numpy()) == 0
                restored = _values_but_skipped(fresh)[:len(old_store)]
                for a, b in zip(_values_but_skipped(opt)[:len(old_store)], restored):
                    np.testing.assert_array_equal(a, b)
                if len(old_store) < len(old):  # φ and the counter restored, the state zero
                    assert all(not np.any(v) for v in _values_but_skipped(fresh)[len(old_store):])


# ---------------------------------------------------------------- warnings and registration

UNTRAINED = r"untrained.*from_pretrained.*from_file"
FRESH = r"φ is not part of the config"


def _warnings_of(function):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function()
    return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_an_untrained_phi_warns():
    with pytest.warns(UserWarning, match=UNTRAINED):
        LearnedOptimizer(**SMALL)
    _, messages = _warnings_of(lambda: LearnedOptimizer(phi=random_phi(small_rule(), 25), **SMALL))
    assert messages == []


@needs_quadratic
def test_a_pretrained_phi_does_not_warn():
    _, messages = _warnings_of(lambda: LearnedOptimizer.from_pretrained("quadratic"))
    assert messages == []


def test_from_config_and_deserialize_warn_once_that_phi_is_fresh():
    opt = LearnedOptimizer(phi=random_phi(small_rule(), 26), **SMALL)
    for restore in (lambda: LearnedOptimizer.from_config(opt.get_config()),
                    lambda: keras.optimizers.deserialize(keras.optimizers.serialize(opt))):
        restored, messages = _warnings_of(restore)
        assert isinstance(restored, LearnedOptimizer)
        assert len(messages) == 1, messages  # the fresh-φ warning, not also the untrained one
        assert "φ is not part of the config" in messages[0] and "load_model" in messages[0]


def test_load_model_restores_phi_without_a_fresh_phi_warning(tmp_path):
    model = dense_model()
    model.compile(optimizer=LearnedOptimizer(phi=random_phi(small_rule(), 27), **SMALL), loss="mse")
    x, y = regression_data(8)
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded, messages = _warnings_of(lambda: keras.models.load_model(tmp_path / "model.keras"))
    assert not [m for m in messages if "φ" in m], messages
    _, messages = _warnings_of(lambda: loaded.fit(x, y, epochs=1, verbose=0))
    assert not [m for m in messages if "φ" in m], messages
    np.testing.assert_array_equal(flat(small_rule(), loaded.optimizer.phi), random_phi(small_rule(), 27))

    previous = keras.mixed_precision.global_policy()  # inside a LossScaleOptimizer too
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = dense_model()
        mixed.compile(optimizer=LearnedOptimizer(phi=random_phi(small_rule(), 27), **SMALL), loss="mse")
        mixed.fit(x, y, epochs=1, verbose=0)
        mixed.save(tmp_path / "mixed.keras")
        loaded, messages = _warnings_of(lambda: keras.models.load_model(tmp_path / "mixed.keras"))
        _, fit_messages = _warnings_of(lambda: loaded.fit(x, y, epochs=1, verbose=0))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert not [m for m in messages + fit_messages if "φ" in m], messages + fit_messages


def test_a_phi_not_restored_during_a_keras_load_warns_at_the_first_step(monkeypatch):
    """from_config inside a Keras load defers its warning to the φ restore: restored, nothing; not restored (e.g. the
    file's optimizer variables did not fit), the first step warns."""
    source = LearnedOptimizer(phi=random_phi(small_rule(), 28), **SMALL)
    store = {}
    source.save_own_variables(store)
    monkeypatch.setattr(ko, "_keras_file_loading", lambda: True)
    for restore in (True, False):
        w = keras.Variable(np.zeros(3, np.float32))
        opt, messages = _warnings_of(lambda: LearnedOptimizer.from_config(source.get_config()))
        assert messages == []
        if restore:
            opt.load_own_variables(store)
        _, messages = _warnings_of(lambda: opt.apply([tf.ones(3)], [w]))
        assert [m for m in messages if "φ was not restored" in m] == ([] if restore else [messages[0]]), messages
        _, messages = _warnings_of(lambda: opt.apply([tf.ones(3)], [w]))
        assert messages == []  # once


@pytest.mark.parametrize("identifier", ["LearnedOptimizer", "l2l_tf>LearnedOptimizer"])
def test_keras_optimizers_get_by_name(identifier):
    with pytest.warns(UserWarning, match=FRESH):
        opt = keras.optimizers.get(identifier)
    assert isinstance(opt, LearnedOptimizer) and opt.skip_nonfinite
    assert keras.optimizers.serialize(opt)["registered_name"] == "l2l_tf>LearnedOptimizer"
    model = dense_model()
    with pytest.warns(UserWarning, match=FRESH):
        model.compile(optimizer=identifier, loss="mse")
    assert isinstance(model.optimizer, LearnedOptimizer)
