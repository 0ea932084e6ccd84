"""matmul_precision="bfloat16" (issue 12): the LSTM step's three GEMMs on bfloat16-rounded inputs with float32 sums.

The pure-TF reference states the semantics (its GEMMs round their inputs, also in the gradient) and is checked against
float64 NumPy with bfloat16 rounding written out; the fused CPU kernels (vdpbf16ps) must agree with it to float32
rounding, and move the float32 results by a bfloat16-sized amount. A meta-training run in bfloat16 must still learn.
"""
import numpy as np
import pytest
import tensorflow as tf

from l2l_tf import LSTMUpdateRule, ops
from l2l_tf.problems import QuadraticFamily, seeds_for
from l2l_tf.training import MetaTrainer

RULE = LSTMUpdateRule(20, 20, "paper")
CONFIG = RULE.step_config


def _kernels():
    from l2l_tf import _kernels
    return _kernels


needs_bf16 = pytest.mark.skipif(not ops.fused_bf16_available(),
                                reason="the op library lacks AVX512_BF16 (or did not load)")


def round_bf16(x):
    """float32 → nearest bfloat16 (ties to even), back as float64: the top 16 bits after adding half an ulp."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


def inputs(n, seed=0, config=CONFIG):
    rng = np.random.default_rng(seed)
    grad = (rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 0, n)).astype(np.float32)
    state = rng.standard_normal((config.state_rows, n)).astype(np.float32)
    h1, h2 = config.hidden1, config.hidden2
    for rows in (slice(0, h1), slice(2 * h1, 2 * h1 + h2)):  # h rows in (-1, 1)
        state[rows] = np.tanh(state[rows])
    return tf.constant(grad), tf.constant(state)


def step_and_gradients(implementation, precision, phi, grad, state, n, config=CONFIG):
    """Update, new state and the gradients of a fixed linear function of them w.r.t. grad, state and φ."""
    weights = np.random.default_rng(7)
    w_update = tf.constant(weights.standard_normal(n).astype(np.float32))
    w_state = tf.constant(weights.standard_normal((config.state_rows, n)).astype(np.float32))
    leaves = tf.nest.flatten(phi)
    with tf.GradientTape() as tape:
        tape.watch([grad, state, *leaves])
        with ops.matmul_precision(precision):
            (update,), (new_state,) = ops.lstm_steps(phi, [grad], [state], 0.1, config, implementation)
        loss = tf.reduce_sum(update * w_update) + tf.reduce_sum(new_state * w_state)
    d_grad, d_state, *d_phi = tape.gradient(loss, [grad, state, *leaves])
    return {"update": update, "new_state": new_state, "d_grad": d_grad, "d_state": d_state,
            **{f"d_phi[{i}]": g for i, g in enumerate(d_phi)}}


def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_reference_rounds_the_gemm_inputs_to_bfloat16():
    """The reference's layer-1 gates equal float64 W16 @ x16 + b, with W and the inputs rounded to bfloat16."""
    phi = RULE.init_phi(3)
    grad, state = inputs(50)
    x = ops.preprocess(grad, CONFIG).numpy()
    h1 = state.numpy()[:20]
    w, b = phi["lstm1"]["w"].numpy(), phi["lstm1"]["b"].numpy()
    from l2l_tf.ops import reference
    with_rounding = reference._bfloat16_matmul(tf.constant(w), tf.constant(np.concatenate([x, h1]))).numpy()
    expected = round_bf16(w) @ round_bf16(np.concatenate([x, h1]))
    np.testing.assert_allclose(with_rounding, expected, rtol=1e-5, atol=1e-6)
    exact = w.astype(np.float64) @ np.concatenate([x, h1]).astype(np.float64)
    assert np.abs(exact - expected).max() > 1e-4  # the rounding is there
    del b


def test_reference_gradient_rounds_its_gemm_inputs():
    """The custom gradient: dW = round(dz) round(x)^T, dx = round(W)^T round(dz) (what the kernels compute)."""
    from l2l_tf.ops import reference
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    dz = rng.standard_normal((8, 5)).astype(np.float32)
    w_t, x_t = tf.constant(w), tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch([w_t, x_t])
        z = reference._bfloat16_matmul(w_t, x_t)
    dw, dx = tape.gradient(z, [w_t, x_t], output_gradients=tf.constant(dz))
    np.testing.assert_allclose(dw.numpy(), round_bf16(dz) @ round_bf16(x).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx.numpy(), round_bf16(w).T @ round_bf16(dz), rtol=1e-5, atol=1e-6)


@needs_bf16
@pytest.mark.parametrize("n", [10, 300, 2000])
def test_fused_bfloat16_matches_the_reference(n):
    phi = RULE.init_phi(1)
    grad, state = inputs(n, seed=n)
    fused16 = step_and_gradients("fused", "bfloat16", phi, grad, state, n)
    ref16 = step_and_gradients("reference", "bfloat16", phi, grad, state, n)
    ref32 = step_and_gradients("reference", "float32", phi, grad, state, n)
    for name in fused16:
        # Agreement to float32 rounding; a float32 difference that lands on a bfloat16 rounding boundary moves one
        # GEMM input by a bfloat16 ulp, hence the norm-wise bound.
        assert relative(fused16[name], ref16[name]) < 2e-4, name
        # ... while bfloat16 moves the results by ~0.1% of their size (the output bias's gradient has no GEMM).
        moved = relative(ref16[name], ref32[name])
        assert moved < 2e-2, name
        if name not in ("d_phi[4]",):  # out/b: d_update summed, no GEMM in its path
            assert moved > 1e-5, name


@needs_bf16
@pytest.mark.parametrize("hidden", [(3, 27), (24, 5)])
def test_fused_bfloat16_matches_the_reference_for_other_sizes(hidden):
    """Gate counts that are not a multiple of the vector (4 x 3, 4 x 27: padded lanes) or of the weight gradient's
    5-vector tile (108 gates: a tile of 5 vectors and one of 2), over three chunks with a partial one."""
    rule = LSTMUpdateRule(*hidden, "paper")
    config = rule.step_config
    phi = rule.init_phi(2)
    n = 700
    grad, state = inputs(n, seed=5, config=config)
    fused16 = step_and_gradients("fused", "bfloat16", phi, grad, state, n, config)
    ref16 = step_and_gradients("reference", "bfloat16", phi, grad, state, n, config)
    for name in fused16:
        assert relative(fused16[name], ref16[name]) < 2e-4, name


@pytest.mark.parametrize("implementation", ["reference", pytest.param("fused", marks=needs_bf16)])
def test_raw_gradients_at_infinity_saturate_at_the_largest_bfloat16(implementation):
    """preprocess="none" feeds the raw gradient to the gates: ±inf (as ±FLT_MAX) and ±FLT_MAX round to ±inf in
    bfloat16, and 0 * inf made d_phi NaN. The GEMM input saturates at ±max bfloat16 instead: every output and gradient
    is finite, and the same as with ±max bfloat16 given directly."""
    rule = LSTMUpdateRule(20, 20, "none")
    config = rule.step_config
    phi = rule.init_phi(4)
    n = 300
    grad, state = inputs(n, seed=9, config=config)
    flt_max, bf16_max = float(np.finfo(np.float32).max), float(round_bf16(np.float32(3.3895314e38)))
    extreme = grad.numpy().copy()
    extreme[[3, 4, 290]] = [np.inf, -flt_max, flt_max]
    saturated = extreme.copy()
    saturated[[3, 4, 290]] = [bf16_max, -bf16_max, bf16_max]
    got = step_and_gradients(implementation, "bfloat16", phi, tf.constant(extreme), state, n, config)
    same = step_and_gradients(implementation, "bfloat16", phi, tf.constant(saturated), state, n, config)
    for name, value in got.items():
        value = value.numpy()
        assert np.isfinite(value).all(), name
        if name == "d_grad":  # 0 at ±inf (the clamp is flat there), the derivative 1 · upstream elsewhere
            value, other = np.delete(value, 3), np.delete(same[name].numpy(), 3)
        else:
            other = same[name].numpy()
        np.testing.assert_array_equal(value, other, err_msg=name)
    if implementation == "fused":
        reference = step_and_gradients("reference", "bfloat16", phi, tf.constant(extreme), state, n, config)
        for name in got:
            assert relative(got[name], reference[name]) < 2e-4, name


@needs_bf16
def test_saved_activations_give_the_recomputed_backward_bit_for_bit():
    kernels = _kernels()
    rng = np.random.default_rng(0)
    n = 700
    phi = (rng.standard_normal(CONFIG.num_params) * 0.3).astype(np.float32)
    grad, state = (x.numpy() for x in inputs(n))
    d_update = rng.standard_normal(n).astype(np.float32)
    d_state = rng.standard_normal((CONFIG.state_rows, n)).astype(np.float32)
    args = dict(hidden1=20, hidden2=20, preprocess="paper", matmul_precision="bfloat16")
    update, new_state, acts = kernels.forward_cpu(phi, grad, state, 0.1, save_activations=True, **args)
    recomputed = kernels.backward_cpu(phi, grad, state, 0.1, d_update, d_state, **args)
    saved = kernels.backward_cpu(phi, grad, state, 0.1, d_update, d_state, activations=acts, **args)
    for a, b in zip(recomputed, saved):
        np.testing.assert_array_equal(a, b)
    plain = kernels.forward_cpu(phi, grad, state, 0.1, hidden1=20, hidden2=20, preprocess="paper")
    assert 1e-5 < relative(update, plain[0]) < 1e-2


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="matmul_precision"):
        with ops.matmul_precision("float16"):
            pass
    with pytest.raises(ValueError, match="matmul_precision"):
        MetaTrainer(LSTMUpdateRule(4, 3, "none"), QuadraticFamily(batch_size=2, num_dims=2), num_steps=2,
                    unroll_length=2, matmul_precision="bf16")
    if ops.fused_available():
        with pytest.raises(ValueError, match="matmul_precision"):
            _kernels().forward_cpu(np.zeros(CONFIG.num_params, np.float32), np.zeros(3, np.float32),
                                   np.zeros((80, 3), np.float32), 0.1, preprocess="paper", matmul_precision="half")
        from l2l_tf.ops import fused
        with pytest.raises(tf.errors.InvalidArgumentError, match="matmul_precision"):
            fused._load().l2l_lstm_step_multi(tf.zeros(CONFIG.num_params), [tf.zeros(3)], [tf.zeros((80, 3))], 0.1,
                                              preprocess="paper", matmul_precision="half")


@pytest.mark.skipif(not ops.fused_available(), reason="no op library")
@pytest.mark.parametrize("has_bf16", [False, True])
def test_auto_runs_the_reference_in_bfloat16_where_the_op_lacks_avx512_bf16(monkeypatch, has_bf16):
    """"auto" inside a bfloat16 block picks the fused op only where its kernels have the bfloat16 GEMMs; float32
    steps and "fused" are unaffected (a "fused" bfloat16 step without them raises, naming AVX512_BF16)."""
    monkeypatch.setattr(ops, "fused_bf16_available", lambda: has_bf16)
    assert ops.resolve_implementation("auto") == "fused"
    with ops.matmul_precision("bfloat16"):
        assert ops.resolve_implementation("auto") == ("fused" if has_bf16 else "reference")
        assert ops.resolve_implementation("fused") == "fused"
    monkeypatch.undo()
    if not ops.fused_bf16_available():
        grad = tf.constant(inputs(40)[0])
        with ops.matmul_precision("bfloat16"):
            with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="AVX512_BF16"):
                RULE.step(RULE.init_phi(seed=0), [grad], RULE.init_state([grad]), implementation="fused")


def test_bfloat16_needs_a_rule_with_lstm_gemms():
    """A rule none of whose steps run the LSTM's GEMMs refuses "bfloat16" (it would be ignored); a Partitioned rule
    takes it when one of its groups is an LSTM."""
    from rules_for_tests import NormalizedMomentum
    from l2l_tf import LearnedOptimizer
    from l2l_tf.rules import Partitioned
    family = QuadraticFamily(batch_size=2, num_dims=2)
    momentum = NormalizedMomentum()
    assert not momentum.has_lstm_gemms and RULE.has_lstm_gemms
    mixed = Partitioned({"lstm": LSTMUpdateRule(4, 3, "none"), "other": momentum}, assign=[("lstm", "rank>=2")],
                        default="other")
    assert mixed.has_lstm_gemms
    assert not Partitioned({"a": momentum, "b": NormalizedMomentum(0.5)}, assign=[("a", "rank>=2")],
                           default="b").has_lstm_gemms
    with pytest.raises(ValueError, match="matmul_precision='bfloat16'.*'test_normalized_momentum' rule has none"):
        MetaTrainer(momentum, family, num_steps=2, unroll_length=2, matmul_precision="bfloat16")
    with pytest.raises(ValueError, match="matmul_precision='bfloat16'.*has none"):
        LearnedOptimizer(rule=momentum, matmul_precision="bfloat16")
    MetaTrainer(momentum, family, num_steps=2, unroll_length=2)  # float32: fine
    MetaTrainer(mixed, family, num_steps=2, unroll_length=2, matmul_precision="bfloat16")


def test_precision_block_is_restored_and_read_when_the_step_is_built():
    assert ops.current_matmul_precision() == "float32"
    with ops.matmul_precision("bfloat16"):
        assert ops.current_matmul_precision() == "bfloat16"
        with ops.matmul_precision("float32"):
            assert ops.current_matmul_precision() == "float32"
        assert ops.current_matmul_precision() == "bfloat16"
    assert ops.current_matmul_precision() == "float32"


@needs_bf16
def test_meta_training_in_bfloat16_learns_quadratics():
    """φ meta-trained with bfloat16 GEMMs (fused op) optimizes held-out quadratics, validated in float32."""
    family = QuadraticFamily(batch_size=32, num_dims=10)
    rule = LSTMUpdateRule(preprocess="none", output_scale=1.0)
    trainer = MetaTrainer(rule, family, num_steps=40, unroll_length=20, learning_rate=3e-3, seed=1,
                          implementation="fused", matmul_precision="bfloat16")
    seeds = seeds_for("validation", 5, 1)
    initial = trainer.validate(seeds)
    trainer.train(150, validation_every=50, verbose=0)
    assert trainer.best_validation < 0.5 * initial, (initial, trainer.history)
