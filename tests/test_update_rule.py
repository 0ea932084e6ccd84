import math

import numpy as np
import pytest
import tensorflow as tf

import lstm_step_numpy
from l2l_tf import LSTMUpdateRule, load_phi, save_phi


def random_phi(rule, seed=0, scale=0.5):
    return tf.constant(np.random.default_rng(seed).normal(0, scale, rule.num_params), tf.float32)


def test_hand_derived_single_unit_step():
    # hidden 1/1, raw gradient. With every weight zero and zero biases all gates are σ(0) = 1/2 and the cell
    # candidate tanh(0) = 0, so c' = c/2 and h' = tanh(c/2)/2; the output is wo·h2' + bo.
    rule = LSTMUpdateRule(1, 1, "none", output_scale=0.5, implementation="reference")
    phi = np.zeros(rule.num_params, np.float32)
    phi[-2], phi[-1] = 2.0, 0.25  # wo, bo
    state = tf.constant([[0.3], [2.0], [0.7], [-4.0]])  # h1, c1, h2, c2
    updates, new_state = rule.step(tf.constant(phi), [tf.constant([5.0])], rule.init_state([tf.zeros([1])])._replace(lstm=(state,)))
    h2 = math.tanh(-2.0) / 2
    np.testing.assert_allclose(new_state.lstm[0].numpy()[:, 0], [math.tanh(1.0) / 2, 1.0, h2, -2.0], rtol=1e-6)
    np.testing.assert_allclose(updates[0].numpy(), [0.5 * (2.0 * h2 + 0.25)], rtol=1e-6)


@pytest.mark.parametrize("preprocess", ["none", "paper", "clamped"])
def test_reference_matches_float64_numpy(preprocess):
    rule = LSTMUpdateRule(7, 5, preprocess, output_scale=0.1, implementation="reference")
    rng = np.random.default_rng(1)
    phi = random_phi(rule)
    g = (rng.normal(size=300) * 10.0 ** rng.uniform(-9, 3, 300)).astype(np.float32)
    state = rng.normal(size=(rule.state_rows, 300)).astype(np.float32)
    (update,), new_state = rule.step(phi, [tf.constant(g)], rule.init_state([g])._replace(lstm=(tf.constant(state),)))
    ref_update, ref_state = lstm_step_numpy.lstm_step_np(phi.numpy(), g, state, 0.1, 7, 5, preprocess,
                                                         rule.preprocess_param)
    np.testing.assert_allclose(update.numpy(), ref_update, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_state.lstm[0].numpy(), ref_state, rtol=1e-5, atol=1e-6)


def run_steps(rule, phi, grad_seq, shapes):
    state = rule.init_state([tf.zeros(s) for s in shapes])
    out = []
    for grads in grad_seq:
        updates, state = rule.step(phi, grads, state)
        out.append([u.numpy() for u in updates])
    return out, state


def test_permuting_coordinates_permutes_updates():
    rule = LSTMUpdateRule(implementation="reference")
    phi = random_phi(rule, 3)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=50).astype(np.float32) * 1e-2 for _ in range(4)]
    perm = rng.permutation(50)
    plain, _ = run_steps(rule, phi, [[tf.constant(g)] for g in grads], [(50,)])
    permuted, _ = run_steps(rule, phi, [[tf.constant(g[perm])] for g in grads], [(50,)])
    for a, b in zip(plain, permuted):
        np.testing.assert_allclose(a[0][perm], b[0], rtol=1e-6, atol=1e-9)
    assert not np.allclose(plain[-1][0], plain[-1][0][0])  # the updates really differ across coordinates


def test_each_tensor_keeps_its_own_state():
    rule = LSTMUpdateRule(implementation="reference")
    phi = random_phi(rule, 4)
    rng = np.random.default_rng(1)
    seq_a = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    seq_b = [rng.normal(size=(5,)).astype(np.float32) for _ in range(3)]
    joint, state = run_steps(rule, phi, [[tf.constant(a), tf.constant(b)] for a, b in zip(seq_a, seq_b)],
                             [(3, 4), (5,)])
    alone_a, _ = run_steps(rule, phi, [[tf.constant(a)] for a in seq_a], [(3, 4)])
    other_b, _ = run_steps(rule, phi, [[tf.constant(a), tf.constant(-3 * b)] for a, b in zip(seq_a, seq_b)],
                           [(3, 4), (5,)])
    for j, a, o in zip(joint, alone_a, other_b):
        np.testing.assert_allclose(j[0], a[0], rtol=1e-6)
        np.testing.assert_allclose(o[0], a[0], rtol=1e-6)  # b's gradients never leak into a's updates
    assert [s.shape for s in state.lstm] == [(80, 12), (80, 5)]


def test_shapes_and_dtypes_round_trip():
    rule = LSTMUpdateRule(implementation="reference")
    params = [tf.constant(1.5), tf.ones([7]), tf.ones([3, 3, 2, 4], tf.float16), tf.ones([2, 3], tf.float64)]
    updates, state = rule.step(rule.init_phi(), params, rule.init_state(params))
    assert [tuple(u.shape) for u in updates] == [(), (7,), (3, 3, 2, 4), (2, 3)]
    assert [u.dtype for u in updates] == [tf.float32, tf.float32, tf.float16, tf.float64]
    assert all(s.dtype == tf.float32 for s in state.lstm)


def test_init_phi_forget_bias_and_determinism():
    rule = LSTMUpdateRule()
    named = rule.named_phi(rule.init_phi(7))
    np.testing.assert_array_equal(named["b1"].numpy()[20:40], 1.0)
    np.testing.assert_array_equal(named["b1"].numpy()[:20], 0.0)
    np.testing.assert_array_equal(named["b2"].numpy()[20:40], 1.0)
    np.testing.assert_array_equal(rule.init_phi(7).numpy(), rule.init_phi(7).numpy())
    assert not np.array_equal(rule.init_phi(7).numpy(), rule.init_phi(8).numpy())


def test_init_phi_output_gain_scales_only_the_output_layer():
    rule = LSTMUpdateRule()
    plain, small = rule.named_phi(rule.init_phi(3)), rule.named_phi(rule.init_phi(3, output_gain=0.1))
    for name in ("w1", "b1", "w2", "b2", "bo"):
        np.testing.assert_array_equal(small[name].numpy(), plain[name].numpy())
    np.testing.assert_allclose(small["wo"].numpy(), 0.1 * plain["wo"].numpy(), rtol=1e-6)
    assert np.any(plain["wo"].numpy() != 0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="implementation"):
        LSTMUpdateRule(implementation="cuda")
    with pytest.raises(ValueError, match="output_scale"):
        LSTMUpdateRule(output_scale=float("nan"))
    rule = LSTMUpdateRule()
    with pytest.raises(ValueError, match="phi must have shape"):
        rule.check_phi(tf.zeros([10]))
    with pytest.raises(ValueError, match="gradients"):
        rule.step(rule.init_phi(), [tf.ones(3)], rule.init_state([tf.ones(3), tf.ones(2)]))


def test_save_and_load_phi(tmp_path):
    rule = LSTMUpdateRule(hidden1=8, preprocess="clamped", output_scale=0.01)
    phi = random_phi(rule, 5)
    path = tmp_path / "phi.npz"
    save_phi(str(path), rule, phi, note="x")
    loaded_rule, loaded_phi, metadata = load_phi(str(path))
    assert loaded_rule == rule and metadata == {"note": "x"}
    np.testing.assert_array_equal(loaded_phi.numpy(), phi.numpy())
    with pytest.raises(FileNotFoundError):
        load_phi(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a"):
        load_phi(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "nan.npz", phi=np.full(rule.num_params, np.nan, np.float32), config="{}")
    with pytest.raises(ValueError, match="non-finite"):
        load_phi(str(tmp_path / "nan.npz"))
