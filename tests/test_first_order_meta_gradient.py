"""The first-order meta-gradient (second_derivatives=False) reuses the inner gradient ∇f(θ_t) instead of
backpropagating through the optimizee's forward pass again (issue 12): it equals the meta-gradient of the plain
formula (a tape over Σ_t w_t f(θ_t)) and its graph holds fewer matrix products."""
import numpy as np
import pytest
import tensorflow as tf

from l2l_tf import LSTMUpdateRule, evaluation, ops
from l2l_tf.problems import KerasModelFamily, QuadraticFamily
from l2l_tf.training import MetaTrainer

RULE = LSTMUpdateRule(4, 3, "none", output_scale=0.1)


def old_unroll_loss(trainer, phi, params, extra, rule_state, data, start_step):
    """The meta-loss as written before issue 12: every f(θ_t) differentiated through the optimizee's forward pass."""
    family, rule = trainer.family, trainer.rule
    weights = trainer.loss_weights[start_step:start_step + trainer.unroll_length]
    params, total = tuple(params), 0.0
    for k in range(trainer.unroll_length):
        loss, grads, extra = evaluation.value_and_grad(family, params, extra, data, start_step + k)
        if k > 0:
            total += weights[k - 1] * trainer._objective(loss)
        if not trainer.second_derivatives:
            grads = [tf.stop_gradient(g) for g in grads]
        updates, rule_state = rule.step(phi, grads, rule_state, implementation=trainer.implementation)
        params = tuple(p + u for p, u in zip(params, updates))
    final_loss, _ = family.loss(params, extra, data, start_step + trainer.unroll_length)
    total += weights[trainer.unroll_length - 1] * trainer._objective(final_loss)
    return total


def old_meta_gradient(trainer, phi, params, extra, rule_state, data, start_step):
    with tf.GradientTape() as tape:
        tape.watch(tf.nest.flatten(phi))
        loss = old_unroll_loss(trainer, phi, params, extra, rule_state, data, start_step)
    return loss, tape.gradient(loss, phi)


def mlp_family(hidden=(6,)):
    from l2l_tf.problems.mnist import build_mlp, cross_entropy

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8)).astype(np.float32), rng.integers(0, 3, 32).astype(np.int32)
    # init_stddev 0.3: large enough weights that the hidden layer's gradients matter
    return KerasModelFamily(lambda seed: build_mlp(hidden, "sigmoid", num_classes=3, input_dim=8, seed=seed,
                                                   init_stddev=0.3),
                            (x, y), cross_entropy(), batch_size=8)


def batch_norm_family():
    from l2l_tf.problems.cifar import build_convnet, cross_entropy

    rng = np.random.default_rng(1)
    x, y = rng.uniform(size=(16, 32, 32, 3)).astype(np.float32), rng.integers(0, 3, 16).astype(np.int32)
    return KerasModelFamily(lambda seed: build_convnet(3, seed=seed, channels=2, kernel_size=3, conv_layers=1,
                                                       dense_units=4),
                            (x, y), cross_entropy(), batch_size=4)


FAMILIES = {"quadratic": lambda: QuadraticFamily(batch_size=4, num_dims=3), "mlp": mlp_family,
            "batch_norm": batch_norm_family}


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in tf.nest.flatten(tree)])


@pytest.mark.parametrize("meta_loss", ["sum", "log"])
@pytest.mark.parametrize("second_derivatives", [False, True])
@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_meta_gradient_equals_the_plain_formula(family_name, second_derivatives, meta_loss):
    family = FAMILIES[family_name]()
    trainer = MetaTrainer(RULE, family, num_steps=8, unroll_length=4, meta_loss=meta_loss,
                          loss_weights=np.linspace(1, 2, 8), second_derivatives=second_derivatives,
                          implementation="reference")
    phi = tf.nest.map_structure(lambda v: tf.constant(v, tf.float32), RULE.init_phi(3))
    problem = family.sample(7)
    params, extra, state = problem.params, problem.extra, RULE.init_state(problem.params)
    for start in (0, 4):  # the second unroll starts from the first one's carry (θ, batch-norm statistics, state)
        loss, grad, (next_params, next_extra, next_state) = trainer.meta_gradient(
            phi, params, extra, state, problem.data, tf.constant(start))
        old_loss, old_grad = old_meta_gradient(trainer, phi, params, extra, state, problem.data, tf.constant(start))
        new, old = flat(grad), flat(old_grad)
        assert np.all(np.isfinite(new)) and np.abs(old).max() > 0
        assert float(loss) == float(old_loss)  # the same forward computation
        if second_derivatives:
            np.testing.assert_array_equal(new, old)  # the path of old, unchanged
        else:
            np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6 * np.abs(old).max())
        params, extra, state = next_params, next_extra, next_state


MATMULS = {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3"}


def count_matmuls(graph):
    """MatMul ops of a graph, those of the functions it calls included."""
    count = sum(op.type in MATMULS for op in graph.get_operations())
    library = graph.as_graph_def().library
    return count + sum(node.op in MATMULS for function in library.function for node in function.node_def)


def test_first_order_meta_gradient_does_not_recompute_the_inner_gradient():
    """The MLP 8 → 6 → 3: ∇f(θ_t) costs 3 matrix products (two weight gradients, one backpropagated activation).
    The old path repeated them for each of the unroll's K − 1 differentiated f(θ_t); the new one must not, while
    second derivatives (which need them) keep every one."""
    family = mlp_family()
    unroll = 3
    problem = family.sample(0)
    phi = tf.nest.map_structure(lambda v: tf.constant(v, tf.float32), RULE.init_phi(0))
    state = RULE.init_state(problem.params)
    counts = {}
    for second in (False, True):
        trainer = MetaTrainer(RULE, family, num_steps=unroll, unroll_length=unroll, second_derivatives=second,
                              implementation="reference")
        new = tf.function(lambda *args: trainer.meta_gradient(*args)[:2], autograph=False)
        old = tf.function(lambda *args: old_meta_gradient(trainer, *args), autograph=False)
        args = (phi, problem.params, problem.extra, state, problem.data, tf.constant(0))
        counts[second] = [count_matmuls(fn.get_concrete_function(*args).graph) for fn in (new, old)]
    (new, old), (new_second, old_second) = counts[False], counts[True]
    assert new <= old - 3 * (unroll - 1), counts
    assert new_second == old_second, counts


def traced_meta_gradient(family, rule, phi, implementation, jit_compile=False):
    """The first-order meta-gradient of one 3-step unroll, traced by tf.function (XLA-compiled if asked)."""
    trainer = MetaTrainer(rule, family, num_steps=3, unroll_length=3, phi=phi, implementation=implementation)
    problem = family.sample(2)
    fn = tf.function(lambda *args: trainer.meta_gradient(*args)[:2], jit_compile=jit_compile, autograph=False)
    loss, grad = fn(tf.nest.map_structure(tf.convert_to_tensor, trainer.phi), problem.params, problem.extra,
                    rule.init_state(problem.params), problem.data, tf.constant(0))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(flat(grad)))
    return flat(grad)


@pytest.mark.parametrize("variant", ["fused", "xla"])
def test_first_order_meta_gradient_through_the_fused_op_and_xla(variant):
    """The custom-gradient term also traces with the fused op and compiles with XLA, to the same meta-gradient."""
    if variant == "fused" and not ops.fused_available():
        pytest.skip("the fused op library is not built")
    family, rule = mlp_family(), LSTMUpdateRule(4, 3, "paper", output_scale=0.1)
    phi = rule.init_phi(1)
    reference = traced_meta_gradient(family, rule, phi, "reference")
    other = (traced_meta_gradient(family, rule, phi, "fused") if variant == "fused"
             else traced_meta_gradient(family, rule, phi, "reference", jit_compile=True))
    np.testing.assert_allclose(other, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())


def _multi_grad_ops(graph):
    found = [op for op in graph.get_operations() if op.type == "L2lLstmStepMultiGrad"]
    for function in graph.as_graph_def().library.function:
        found += [node for node in function.node_def if node.op == "L2lLstmStepMultiGrad"]
    return found


def _input_gradients_attr(op):
    return op.get_attr("input_gradients") if hasattr(op, "get_attr") else op.attr["input_gradients"].b


def test_fused_gradient_skips_the_input_gradient_under_a_stop_gradient():
    """Optimizee gradients under a stop-gradient (even reshaped on the way): the gradient op is built with
    input_gradients=False, and d_phi and the state's gradient are those of the full gradient, bit for bit. Gradients
    that are function arguments keep theirs (and it is the reference's)."""
    if not ops.fused_available():
        pytest.skip("the fused op library is not built")
    cfg = ops.StepConfig(20, 20, "paper", 10.0)
    rng = np.random.default_rng(5)
    sizes = [300, 20]
    phi = tf.constant((rng.standard_normal(cfg.num_params) * 0.3).astype(np.float32))
    grads = [tf.constant((rng.standard_normal((n, 1)) * 1e-2).astype(np.float32)) for n in sizes]
    states = [tf.constant((rng.standard_normal((cfg.state_rows, n)) * 0.5).astype(np.float32)) for n in sizes]

    def make(stop, implementation="fused"):
        def fn(phi, grads, states):
            with tf.GradientTape() as tape:
                tape.watch([phi, *grads, *states])
                used = [tf.reshape(tf.stop_gradient(g) if stop else g, [-1]) for g in grads]
                updates, new_states = ops.lstm_steps(ops.phi_tree(phi, cfg), used, states, 0.1, cfg,
                                                     implementation)
                loss = tf.add_n([tf.reduce_sum(u * u) for u in updates] +
                                [tf.reduce_sum(tf.sin(s)) for s in new_states])
            return tape.gradient(loss, [phi, grads, states], unconnected_gradients="zero")
        return tf.function(fn, autograph=False)

    results, attrs = {}, {}
    for stop in (True, False):
        fn = make(stop)
        attrs[stop] = [_input_gradients_attr(op)
                       for op in _multi_grad_ops(fn.get_concrete_function(phi, grads, states).graph)]
        results[stop] = fn(phi, grads, states)
    assert attrs == {True: [False], False: [True]}, attrs
    (d_phi_s, d_grads_s, d_states_s), (d_phi, d_grads, d_states) = results[True], results[False]
    np.testing.assert_array_equal(d_phi_s.numpy(), d_phi.numpy())
    for a, b in zip(d_states_s, d_states):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for g in d_grads_s:  # stopped: no gradient
        assert not np.any(g.numpy())
    reference = make(False, "reference")(phi, grads, states)[1]
    for got, want in zip(d_grads, reference):
        assert np.any(want.numpy())
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5 * np.abs(want.numpy()).max())


def test_meta_trainer_builds_the_fused_gradient_without_input_gradients():
    """The meta-trainer's first-order unroll asks the fused gradient for no optimizee-gradient gradient; with second
    derivatives it does."""
    if not ops.fused_available():
        pytest.skip("the fused op library is not built")
    family, rule = mlp_family(), LSTMUpdateRule(4, 3, "paper", output_scale=0.1)
    problem = family.sample(0)
    for second in (False, True):
        trainer = MetaTrainer(rule, family, num_steps=2, unroll_length=2, second_derivatives=second,
                              implementation="fused")
        fn = tf.function(lambda *args: trainer.meta_gradient(*args)[:2], autograph=False)
        graph = fn.get_concrete_function(tf.nest.map_structure(tf.convert_to_tensor, trainer.phi), problem.params,
                                         problem.extra, rule.init_state(problem.params), problem.data,
                                         tf.constant(0)).graph
        found = [_input_gradients_attr(op) for op in _multi_grad_ops(graph)]
        assert found and all(a == second for a in found), (second, found)


def test_the_unroll_steps_share_one_flat_phi():
    """The meta-trainer's unroll builds the fused kernels' flat φ once, not once per step: its gradient is then one
    AddN of the steps' d_φ, summed in a fixed order. (Per step, each leaf's gradient was an AddN of slices of every
    step's d_φ, which AddN summed in an order that depended on buffer reuse at run time: the meta-gradient's last bits
    changed from run to run.)"""
    if not ops.fused_available():
        pytest.skip("the fused op library is not built")
    family, rule = mlp_family(), LSTMUpdateRule(4, 3, "paper", output_scale=0.1)
    problem = family.sample(0)
    trainer = MetaTrainer(rule, family, num_steps=4, unroll_length=4, implementation="fused")
    fn = tf.function(lambda *args: trainer.meta_gradient(*args)[:2], autograph=False)
    graph = fn.get_concrete_function(tf.nest.map_structure(tf.convert_to_tensor, trainer.phi), problem.params,
                                     problem.extra, rule.init_state(problem.params), problem.data,
                                     tf.constant(0)).graph
    steps = [op for op in graph.get_operations() if op.type == "L2lLstmStepMulti"]
    assert len(steps) == 4
    assert len({op.inputs[0].ref() for op in steps}) == 1, [op.inputs[0].name for op in steps]
    assert len(_multi_grad_ops(graph)) == 4


def test_sharing_flat_phi_shares_it_per_tree_of_graph_tensors_only():
    """Inside `sharing_flat_phi` the same tree of graph tensors gives the same flat tensor; another tree, a tree of
    variables (whose values may change between steps) and code outside the block get their own."""
    cfg = ops.StepConfig(4, 3, "paper")
    init = LSTMUpdateRule(4, 3, "paper").init_phi(0)
    variables = tf.nest.map_structure(tf.Variable, init)

    @tf.function(autograph=False)
    def build():
        a = tf.nest.map_structure(tf.constant, init)
        b = tf.nest.map_structure(lambda v: tf.constant(v) * 2.0, init)
        with ops.sharing_flat_phi():
            inside = [ops.flat_phi(a, cfg), ops.flat_phi(a, cfg), ops.flat_phi(b, cfg)]
            from_variables = [ops.flat_phi(variables, cfg), ops.flat_phi(variables, cfg)]
        outside = [ops.flat_phi(a, cfg), ops.flat_phi(a, cfg)]
        assert inside[0] is inside[1] and inside[2] is not inside[0]
        assert from_variables[0] is not from_variables[1]
        assert outside[0] is not outside[1] and outside[0] is not inside[0]
        return inside[0], inside[2], from_variables[0], outside[0]

    same, doubled, from_variables, outside = build()
    np.testing.assert_array_equal(doubled.numpy(), 2 * same.numpy())
    np.testing.assert_array_equal(from_variables.numpy(), same.numpy())
    np.testing.assert_array_equal(outside.numpy(), same.numpy())
