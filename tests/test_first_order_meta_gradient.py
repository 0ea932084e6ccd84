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
