"""The fused forward keeps its activations for its gradient (issue 12): a backward given them must be the
recomputing backward bit for bit, the saving forward's outputs must agree with the fused forward's to rounding, and the
library must save only inside `ops.saving_activations`, within its byte budget (the meta-trainer's unroll).
"""
import numpy as np
import pytest
import tensorflow as tf

import l2l_tf.ops as ops
from l2l_tf.ops import StepConfig, fused, library
from l2l_tf.rules import LSTMUpdateRule
from lstm_step_numpy import DEFAULT_KINK_PARAMS, extreme_gradients

CONFIGS = [StepConfig(20, 20, "paper"), StepConfig(7, 5, "clamped", 3.0), StepConfig(20, 20, "none")]
SIZES = [1, 20, 257, 1000, 15680]


def _kernels():
    try:
        return library.load_kernels()
    except ImportError as e:
        pytest.skip(f"l2l_tf._kernels is not built ({e})")


def _need_op():
    if not fused.available():
        pytest.skip(f"fused op not built: {fused.load_error()}")


def _inputs(rng, cfg, n):
    kinks = DEFAULT_KINK_PARAMS + (cfg.preprocess_param,)
    phi = (rng.standard_normal(cfg.num_params) * 0.4).astype(np.float32)
    grad = extreme_gradients(rng, n, kinks)
    state = (rng.standard_normal((cfg.state_rows, n)) * 0.6).astype(np.float32)
    return phi, grad, state


def _args(cfg):
    return dict(hidden1=cfg.hidden1, hidden2=cfg.hidden2, preprocess=cfg.preprocess,
                preprocess_param=cfg.preprocess_param)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.hidden1}-{c.hidden2}-{c.preprocess}")
@pytest.mark.parametrize("n", SIZES)
def test_backward_with_saved_activations_is_the_recomputing_backward_bit_for_bit(cfg, n):
    k = _kernels()
    rng = np.random.default_rng(n)
    phi, grad, state = _inputs(rng, cfg, n)
    d_update = rng.standard_normal(n).astype(np.float32)
    d_new_state = rng.standard_normal((cfg.state_rows, n)).astype(np.float32)
    for threads in (1, 2):
        update, new_state = k.forward_cpu(phi, grad, state, 0.3, num_threads=threads, **_args(cfg))
        saved = k.forward_cpu(phi, grad, state, 0.3, num_threads=threads, save_activations=True, **_args(cfg))
        assert saved[2].shape == (cfg.activation_rows, n)
        # The saving forward computes its outputs from the activations one by one: rounding apart from the fused
        # forward (NaN where the gradient is NaN in both).
        np.testing.assert_allclose(saved[0], update, rtol=2e-6, atol=2e-7)
        np.testing.assert_allclose(saved[1], new_state, rtol=2e-6, atol=2e-6)
        for upstream in (d_new_state, None):
            recomputed = k.backward_cpu(phi, grad, state, 0.3, d_update, upstream, num_threads=threads, **_args(cfg))
            read = k.backward_cpu(phi, grad, state, 0.3, d_update, upstream, num_threads=threads,
                                  activations=saved[2], **_args(cfg))
            for name, a, b in zip(("d_phi", "d_grad", "d_state"), recomputed, read):
                np.testing.assert_array_equal(a, b, err_msg=f"{name}, n={n}, threads={threads}")


def _unblocked(act, n, group):
    """[A, n] in coordinate order from the saved layout (csrc/lstm_step.h): per group of `group` coordinates (the last
    may be narrower), a row-major [A, w] block at A * (its first coordinate)."""
    flat, rows = act.reshape(-1), act.shape[0]
    out = np.empty((rows, n), act.dtype)
    for first in range(0, n, group):
        w = min(group, n - first)
        out[:, first:first + w] = flat[rows * first:rows * (first + w)].reshape(rows, w)
    return out


@pytest.mark.parametrize("n", [1, 150, 300])
def test_saved_activations_are_the_lstm_gates(n):
    """Per layer and unit: i, f, g, o, from a hand-computed LSTM step (no preprocessing), in the blocked
    layout: whole blocks, a narrower last block, and a range that is not a whole 256-coordinate chunk."""
    k = _kernels()
    cfg = StepConfig(3, 2, "none")
    rng = np.random.default_rng(3)
    phi, grad, state = _inputs(rng, cfg, n)
    grad[:] = rng.uniform(-1, 1, n).astype(np.float32)
    _, _, act = k.forward_cpu(phi, grad, state, 1.0, save_activations=True, **_args(cfg))
    assert act.shape == (cfg.activation_rows, n)
    flat = phi.astype(np.float64)
    st = state.astype(np.float64)
    h1, c1, h2, c2 = st[0:3], st[3:6], st[6:8], st[8:10]
    sig = lambda z: 1 / (1 + np.exp(-z))
    w1 = flat[:4 * 3 * 4].reshape(12, 4)
    b1 = flat[48:60]
    w2 = flat[60:60 + 8 * 5].reshape(8, 5)
    b2 = flat[100:108]
    expected = []
    for w, b, x, c, h in ((w1, b1, np.vstack([grad.astype(np.float64)[None], h1]), c1, 3), (w2, b2, None, c2, 2)):
        if x is None:
            x = np.vstack([h1_new, h2])
        z = w @ x + b[:, None]
        i, f, g, o = sig(z[:h]), sig(z[h:2 * h]), np.tanh(z[2 * h:3 * h]), sig(z[3 * h:])
        c_new = f * c + i * g
        # Unit by unit, its 4 gate rows together (tanh(c') is recomputed by the backward, not saved).
        expected.append(np.stack([i, f, g, o], axis=1).reshape(4 * h, n))
        h1_new = o * np.tanh(c_new)
    np.testing.assert_allclose(_unblocked(act, n, k.activation_group), np.concatenate(expected), rtol=1e-5,
                               atol=1e-6)


def test_bad_activations_are_clear_errors():
    k = _kernels()
    cfg = StepConfig(20, 20, "paper")
    phi, grad, state = _inputs(np.random.default_rng(0), cfg, 30)
    d_update = np.ones(30, np.float32)
    with pytest.raises(ValueError, match=r"activations must have shape \(160, 30\)"):
        k.backward_cpu(phi, grad, state, 0.1, d_update, None, activations=np.zeros((200, 30), np.float32),
                       **_args(cfg))
    with pytest.raises(ValueError, match="activations must be a float32 array"):
        k.backward_cpu(phi, grad, state, 0.1, d_update, None, activations=np.zeros((160, 30)), **_args(cfg))


def _unrolled_gradient(cfg, budget, sizes, steps=3):
    rule = LSTMUpdateRule(cfg.hidden1, cfg.hidden2, cfg.preprocess, output_scale=0.1)
    phi = tf.nest.map_structure(tf.constant, rule.init_phi(0))
    rng = np.random.default_rng(5)
    grads = [tf.constant((rng.standard_normal(n) * 1e-2).astype(np.float32)) for n in sizes]
    states = [tf.constant((rng.standard_normal((cfg.state_rows, n)) * 0.3).astype(np.float32)) for n in sizes]

    @tf.function
    def run(phi):
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(phi))
            with ops.saving_activations(budget):
                st, total = states, 0.0
                for k in range(steps):
                    updates, st = ops.lstm_steps(phi, [g * (k + 1) for g in grads], st, 0.1, cfg, "fused")
                    total += tf.add_n([tf.reduce_sum(u * u) for u in updates])
        return total, tape.gradient(total, phi)

    graph = run.get_concrete_function(phi).graph
    saving = [op for op in graph.get_operations()
              if op.type == "L2lLstmStepMulti" and op.get_attr("save_activations")]
    loss, grad = run(phi)
    return float(loss), [g.numpy() for g in tf.nest.flatten(grad)], len(saving)


def test_saving_block_keeps_the_meta_gradient_and_its_budget():
    _need_op()
    cfg = StepConfig(20, 20, "paper")
    sizes = [15680, 20, 200, 10]
    per_step = 4 * cfg.activation_rows * sum(sizes)
    loss0, grad0, saving0 = _unrolled_gradient(cfg, 0, sizes)
    loss1, grad1, saving1 = _unrolled_gradient(cfg, 10 * per_step, sizes)
    loss2, grad2, saving2 = _unrolled_gradient(cfg, per_step + 1, sizes)  # room for one step's activations
    assert (saving0, saving1, saving2) == (0, 3, 1)
    for loss, grad in ((loss1, grad1), (loss2, grad2)):
        assert loss == pytest.approx(loss0, rel=1e-6)
        for a, b in zip(grad0, grad):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.max(np.abs(a)))
    # Outside a saving block nothing is saved.
    rule = LSTMUpdateRule(20, 20, "paper")
    traced = tf.function(lambda g, s: ops.lstm_steps(rule.init_phi(0), [g], [s], 0.1, cfg, "fused")
                         ).get_concrete_function(tf.TensorSpec([50]), tf.TensorSpec([80, 50])).graph
    assert not [op for op in traced.get_operations()
                if op.type == "L2lLstmStepMulti" and op.get_attr("save_activations")]


def test_meta_trainer_saves_activations_within_its_memory_and_gets_the_same_meta_gradient():
    _need_op()
    from l2l_tf.problems import QuadraticFamily
    from l2l_tf.training import MetaTrainer

    rule = LSTMUpdateRule(20, 20, "paper", output_scale=0.1)
    family = QuadraticFamily(batch_size=30, num_dims=300)
    results = {}
    for memory in (0, 2**30):
        trainer = MetaTrainer(rule, family, num_steps=10, unroll_length=5, implementation="fused",
                              activation_memory=memory)
        problem = family.sample(7)
        state = rule.init_state(family.param_specs())
        phi = tf.nest.map_structure(tf.convert_to_tensor, trainer.phi)
        loss, grad, _ = tf.function(trainer.meta_gradient)(phi, problem.params, problem.extra, state, problem.data,
                                                          tf.constant(0))
        results[memory] = (float(loss), [g.numpy() for g in tf.nest.flatten(grad)])
    (loss0, grad0), (loss1, grad1) = results[0], results[2**30]
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    for a, b in zip(grad0, grad1):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.max(np.abs(a)))
    with pytest.raises(ValueError, match="activation_memory must be >= 0"):
        MetaTrainer(rule, family, num_steps=10, unroll_length=5, activation_memory=-1)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.hidden1}-{c.hidden2}-{c.preprocess}")
@pytest.mark.parametrize("saved", [False, True])
def test_backward_without_input_gradient_keeps_d_phi_and_d_state_bit_for_bit(cfg, saved):
    """input_gradient=False (a first-order meta-gradient) computes no d_grad; d_phi and d_state do not change."""
    k = _kernels()
    rng = np.random.default_rng(11)
    for n in (20, 1000):
        phi, grad, state = _inputs(rng, cfg, n)
        d_update = rng.standard_normal(n).astype(np.float32)
        upstream = rng.standard_normal((cfg.state_rows, n)).astype(np.float32)
        act = k.forward_cpu(phi, grad, state, 0.3, save_activations=True, **_args(cfg))[2] if saved else None
        full = k.backward_cpu(phi, grad, state, 0.3, d_update, upstream, activations=act, **_args(cfg))
        d_phi, d_grad, d_state = k.backward_cpu(phi, grad, state, 0.3, d_update, upstream, activations=act,
                                                input_gradient=False, **_args(cfg))
        assert d_grad is None and np.any(full[1])
        np.testing.assert_array_equal(d_phi, full[0])
        np.testing.assert_array_equal(d_state, full[2])
