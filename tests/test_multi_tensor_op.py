"""One op call for all of a rule's tensors (L2lLstmStepMulti and its gradient), the shard plan behind it, the
partial-chunk backward, and the kernels' phase counters (issue 12).

The Multi op must give, for every tensor, what the single-tensor op gives on that tensor alone (bit for bit: every
coordinate is computed by the same code whatever shard it lands in), and its d_phi the sum over the tensors; both are
also checked against the pure-TF reference. Sizes cover a lone coordinate, bias-sized tensors inside one partial
sub-block, partial chunks and the MNIST MLP's 784x20 kernel.
"""
import numpy as np
import pytest
import tensorflow as tf

import l2l_tf.ops as ops
from l2l_tf.ops import StepConfig, fused, layout, library, reference
from lstm_step_numpy import DEFAULT_KINK_PARAMS, extreme_gradients


def _need_op():
    if not fused.available():
        pytest.skip(f"fused op not built: {fused.load_error()}")
    return fused._load()


def _kernels():
    try:
        return library.load_kernels()
    except ImportError as e:
        pytest.skip(f"l2l_tf._kernels is not built ({e})")


SIZES = [1, 10, 20, 200, 257, 15680]


def _tensors(rng, cfg, sizes):
    kinks = DEFAULT_KINK_PARAMS + (cfg.preprocess_param,)
    grads = [tf.constant(extreme_gradients(rng, n, kinks)) for n in sizes]
    states = [tf.constant((rng.standard_normal((cfg.state_rows, n)) * 0.6).astype(np.float32)) for n in sizes]
    return grads, states


@pytest.mark.parametrize("cfg", [StepConfig(20, 20, "paper"), StepConfig(7, 5, "clamped", 3.0)],
                         ids=lambda c: f"{c.hidden1}-{c.hidden2}-{c.preprocess}")
def test_multi_op_equals_single_op_per_tensor_and_the_reference(cfg):
    module = _need_op()
    rng = np.random.default_rng(12)
    phi = tf.constant((rng.standard_normal(cfg.num_params) * 0.4).astype(np.float32))
    grads, states = _tensors(rng, cfg, SIZES)
    w_u = [tf.constant(rng.standard_normal(g.shape).astype(np.float32)) for g in grads]
    w_s = [tf.constant(rng.standard_normal(s.shape).astype(np.float32)) for s in states]
    # The last tensor's new state is left out of the loss: its upstream gradient is None, the op's [0] stand-in.
    def loss_of(updates, new_states):
        terms = [tf.reduce_sum(u * w) for u, w in zip(updates, w_u)]
        terms += [tf.reduce_sum(s * w) for s, w in zip(new_states[:-1], w_s[:-1])]
        return tf.add_n(terms)

    def multi():
        with tf.GradientTape() as tape:
            tape.watch([phi, *grads, *states])
            updates, new_states = fused.lstm_steps(phi, grads, states, 0.3, cfg)
            loss = loss_of(updates, new_states)
        return updates, new_states, tape.gradient(loss, [phi, *grads, *states])

    def single(step):
        with tf.GradientTape() as tape:
            tape.watch([phi, *grads, *states])
            results = [step(phi, g, s) for g, s in zip(grads, states)]
            loss = loss_of([u for u, _ in results], [s for _, s in results])
        return [u for u, _ in results], [s for _, s in results], tape.gradient(loss, [phi, *grads, *states])

    mu, ms, mg = multi()
    su, ss, sg = single(lambda p, g, s: fused.lstm_step(p, g, s, 0.3, cfg))
    ru, rs, rg = single(lambda p, g, s: reference.lstm_step(ops.phi_tree(p, cfg), g, s, 0.3, cfg))
    for a, b, r in zip(mu + ms, su + ss, ru + rs):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_allclose(a.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)
    # d_grads and d_states: per coordinate, bit for bit; d_phi: the same sum in another grouping.
    for a, b in zip(mg[1:], sg[1:]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    scale = np.abs(rg[0].numpy()).max()
    np.testing.assert_allclose(mg[0].numpy(), sg[0].numpy(), rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(mg[0].numpy(), rg[0].numpy(), rtol=1e-3, atol=1e-4 * scale)
    for a, r in zip(mg[1:], rg[1:]):
        r = r.numpy()
        finite = np.isfinite(r)
        np.testing.assert_allclose(a.numpy()[finite], r[finite], rtol=1e-3, atol=1e-4 * max(1.0, np.abs(r[finite]).max()))
    # The state left out of the loss got no gradient from its new state: d_state is what flows through update only.
    assert np.isfinite(mg[-1].numpy()).all()


def test_multi_op_through_the_switch_in_a_function_and_its_errors():
    _need_op()
    cfg = StepConfig(20, 20, "paper")
    rng = np.random.default_rng(13)
    tree = ops.phi_tree((rng.standard_normal(cfg.num_params) * 0.4).astype(np.float32), cfg)
    grads, states = _tensors(rng, cfg, [300, 20, 0])
    step = tf.function(lambda p, g, s: ops.lstm_steps(p, g, s, 0.1, cfg, implementation="fused"))
    updates, new_states = step(tree, grads, states)
    ref_u, ref_s = ops.lstm_steps(tree, grads, states, 0.1, cfg, implementation="reference")
    for a, b in zip(updates + new_states, ref_u + ref_s):
        assert a.shape == b.shape
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    # A state of the wrong size is named, with its tensor, by both implementations.
    bad = [states[0], tf.zeros((cfg.state_rows, 21))]
    for implementation in ("fused", "reference"):
        with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="state"):
            ops.lstm_steps(tree, grads[:2], bad, 0.1, cfg, implementation=implementation)


def _finish_times(costs, threads):
    """When each of `threads` equally fast threads is done, taking the shards in order whenever it is free."""
    free = [0] * threads
    for cost in costs:
        t = free.index(min(free))
        free[t] += cost
    return free


def test_shard_plan_covers_every_coordinate_once_in_order_and_threads_taking_them_in_order_finish_together():
    K = _kernels()
    sub = K.sub_block_size()  # 64 coordinates with AVX-512, 16 with AVX2
    assert sub in (16, 64)
    chunk = 256 // sub  # a full chunk's cost
    min_shard = 2 * chunk  # two full chunks
    for sizes in ([15680, 20, 200, 10], [1], [10, 20], [256 * 62], [300, 0, 5000, 7], [256 * 40] * 3, [10 ** 6]):
        for threads in (1, 2, 3, 4):
            shards = K.plan_shards(sizes, threads)
            assert shards == K.plan_shards(sizes, threads)  # deterministic
            covered = {t: np.zeros(n, int) for t, n in enumerate(sizes)}
            costs, slices = [], []
            for shard in shards:
                assert shard, "empty shard"
                cost = 0
                for t, b, e in shard:
                    assert 0 <= b < e <= sizes[t] and b % 256 == 0
                    covered[t][b:e] += 1
                    cost += sum(-(-(min(c + 256, e) - c) // sub) for c in range(b, e, 256))
                    slices.append((t, b, e))
                costs.append(cost)
            for t, n in enumerate(sizes):
                assert (covered[t] == 1).all(), (sizes, threads, t)
            assert slices == sorted(slices), (sizes, threads)  # consecutive, in tensor order
            total = sum(costs)
            if threads == 1:
                assert len(shards) == 1
            # Each shard about 1/threads of what is left (at least two chunks; a smaller remainder joins the last).
            left = total
            for cost in costs[:-1]:
                assert min_shard <= cost < max(min_shard, left // threads) + chunk, (sizes, threads, costs)
                left -= cost
            assert costs[-1] < 2 * min_shard + chunk or len(costs) == 1, (sizes, threads, costs)
            # Threads taking the shards in order end within the last shards' cost of each other.
            finish = _finish_times(costs, threads)
            if len(costs) >= threads:
                assert max(finish) - min(finish) <= max(costs[-threads:]), (sizes, threads, costs, finish)
    # The MNIST MLP on 2 threads: a few shards, largest first.
    costs = [sum(-(-(min(c + 256, e) - c) // sub) for t, b, e in shard for c in range(b, e, 256))
             for shard in K.plan_shards([15680, 20, 200, 10], 2)]
    assert 3 <= len(costs) <= 8 and costs == sorted(costs, reverse=True), costs


@pytest.mark.parametrize("n", [1, 10, 63, 64, 65, 200, 255, 257, 300])
def test_partial_chunk_backward_equals_the_same_coordinates_in_a_whole_chunk(n):
    # A partial chunk computes only its sub-blocks; its coordinates must come out as they do inside a whole chunk,
    # and its d_phi must be the d_phi of those coordinates (the rest of the chunk contributes its own part).
    K = _kernels()
    rng = np.random.default_rng(n)
    h1 = h2 = 20
    full = 512
    phi = (rng.standard_normal(K.num_params(h1, h2, "paper")) * 0.4).astype(np.float32)
    grad = extreme_gradients(rng, full, DEFAULT_KINK_PARAMS)
    state = (rng.standard_normal((80, full)) * 0.6).astype(np.float32)
    du = rng.standard_normal(full).astype(np.float32)
    dns = rng.standard_normal((80, full)).astype(np.float32)
    part = lambda a: np.ascontiguousarray(a[..., :n])
    rest = lambda a: np.ascontiguousarray(a[..., n:])
    whole = K.backward_cpu(phi, grad, state, 0.2, du, dns, h1, h2, "paper", 10.0, num_threads=1)
    small = K.backward_cpu(phi, part(grad), part(state), 0.2, part(du), part(dns), h1, h2, "paper", 10.0,
                           num_threads=1)
    other = K.backward_cpu(phi, rest(grad), rest(state), 0.2, rest(du), rest(dns), h1, h2, "paper", 10.0,
                           num_threads=1)
    np.testing.assert_array_equal(small[1], whole[1][:n])
    np.testing.assert_array_equal(small[2], whole[2][:, :n])
    scale = np.abs(whole[0]).max()
    np.testing.assert_allclose(small[0] + other[0], whole[0], rtol=1e-4, atol=1e-5 * scale)
    assert np.abs(small[0]).max() > 0


def test_phase_ticks_account_for_the_kernels():
    K = _kernels()
    rng = np.random.default_rng(3)
    n = 4096
    phi = (rng.standard_normal(K.num_params(20, 20, "paper")) * 0.4).astype(np.float32)
    grad = extreme_gradients(rng, n, DEFAULT_KINK_PARAMS)
    state = (rng.standard_normal((80, n)) * 0.6).astype(np.float32)
    du = rng.standard_normal(n).astype(np.float32)
    out = K.phase_ticks_cpu(phi, grad, state, 0.1, du, None, preprocess="paper", repeats=2)
    phases = out["phases"]
    assert len(phases) == len(out["forward"]) == len(out["backward"]) and out["tsc_hz"] > 1e8
    fwd, bwd = dict(zip(phases, out["forward"])), dict(zip(phases, out["backward"]))
    for phase in ("gates1", "cell1", "gates2", "cell2"):
        assert fwd[phase] > 0 and bwd[phase] > 0  # the backward recomputes the forward
    for phase in ("cell_backward2", "input_grad2", "cell_backward1", "input_grad1", "weight_grad", "finish"):
        assert fwd[phase] == 0 and bwd[phase] > 0
    # Layer 2's gate GEMM has 40 inputs to layer 1's 22: it must take longer (a check that ticks land where named).
    assert fwd["gates2"] > fwd["gates1"]
