import keras
import numpy as np
import pytest
import tensorflow as tf

from l2l_tf import baselines, evaluation
from l2l_tf.problems import QuadraticFamily, seeds_for

KERAS = {
    "sgd": lambda lr: keras.optimizers.SGD(lr),
    "momentum": lambda lr: keras.optimizers.SGD(lr, momentum=0.9),
    "nag": lambda lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
    "rmsprop": lambda lr: keras.optimizers.RMSprop(lr, rho=0.9, momentum=0.0, epsilon=1e-7),
    "adam": lambda lr: keras.optimizers.Adam(lr, epsilon=1e-7),
}


@pytest.mark.parametrize("name", sorted(KERAS))
def test_functional_baseline_matches_keras_optimizer(name):
    family = QuadraticFamily(batch_size=4, num_dims=3)
    problem = family.sample(0)
    lr = 0.05
    variable = keras.Variable(problem.params[0])
    keras_opt = KERAS[name](lr)
    opt = baselines.BASELINES[name]()
    params, state = problem.params, opt.init(problem.params)
    for step in range(6):
        _, grads, _ = evaluation.value_and_grad(family, params, (), problem.data, step)
        updates, state = opt.update({"learning_rate": tf.constant(lr)}, list(grads), state, params)
        params = tuple(p + u for p, u in zip(params, updates))
        _, keras_grads, _ = evaluation.value_and_grad(family, (tf.convert_to_tensor(variable),), (), problem.data, step)
        keras_opt.apply_gradients([(keras_grads[0], variable)])
        np.testing.assert_allclose(params[0].numpy(), variable.numpy(), rtol=2e-5, atol=1e-6)


def test_evaluator_same_problems_and_fresh_state():
    family = QuadraticFamily(batch_size=8, num_dims=4)
    evaluator = evaluation.Evaluator(family, num_steps=10)
    adam = baselines.adam()
    seeds = seeds_for("test", 3)
    first = evaluator.losses(adam, {"learning_rate": 0.1}, seeds)
    second = evaluator.losses(adam, {"learning_rate": 0.1}, seeds)
    assert first.shape == (3, 11)
    np.testing.assert_array_equal(first, second)  # state reset per problem, problems fixed by seed
    # step 0 is f(θ_0): identical for every optimizer on the same problem
    np.testing.assert_array_equal(first[:, 0], evaluator.losses(baselines.sgd(), {"learning_rate": 0.1}, seeds)[:, 0])
    # by hand: a one-step SGD run on the first problem
    problem = family.sample(seeds[0])
    theta, (w, y) = problem.params[0].numpy(), problem.data
    w, y = w.numpy(), y.numpy()
    loss = lambda t: np.mean(np.sum((np.einsum("bij,bj->bi", w, t) - y) ** 2, -1))
    grad = 2 * np.einsum("bij,bi->bj", w, np.einsum("bij,bj->bi", w, theta) - y) / w.shape[0]
    one = evaluation.Evaluator(family, num_steps=1).losses(baselines.sgd(), {"learning_rate": 0.3}, seeds[:1])
    np.testing.assert_allclose(one[0], [loss(theta), loss(theta - 0.3 * grad)], rtol=1e-5)


def test_tuning_picks_the_best_rate_and_rejects_divergence():
    family = QuadraticFamily(batch_size=8, num_dims=4)
    evaluator = evaluation.Evaluator(family, num_steps=20)
    seeds = seeds_for("validation", 2)
    best, scores = evaluation.tune_learning_rate(evaluator, baselines.sgd(), seeds, grid=(1e-3, 0.1, 1e4))
    assert scores[1e4] == float("inf")          # diverged
    assert best == 0.1 and scores[0.1] < scores[1e-3]
    with pytest.raises(RuntimeError, match="diverged"):
        evaluation.tune_learning_rate(evaluator, baselines.sgd(), seeds, grid=(1e4,))


def test_summarize_records_the_quartiles_over_problems():
    losses = np.random.default_rng(0).lognormal(size=(7, 12))
    summary = evaluation.summarize(losses, learning_rate=0.1)
    assert set(summary) == {"learning_rate", "mean_loss", "final_loss_mean", "final_loss_std", "q25", "q75"}
    np.testing.assert_array_equal(summary["q25"], np.quantile(losses, 0.25, axis=0))
    np.testing.assert_array_equal(summary["q75"], np.quantile(losses, 0.75, axis=0))
    np.testing.assert_array_equal(summary["mean_loss"], np.mean(losses, axis=0))
    assert all(lo <= hi for lo, hi in zip(summary["q25"], summary["q75"]))
    assert all(isinstance(x, float) for x in summary["q25"] + summary["q75"])   # JSON-able


def test_compare_returns_the_tuning_scores():
    family = QuadraticFamily(batch_size=4, num_dims=3)
    evaluator = evaluation.Evaluator(family, num_steps=5)
    from l2l_tf.rules import LSTMUpdateRule

    rule = LSTMUpdateRule(preprocess="none", output_scale=1.0)
    logged = []
    results = evaluation.compare(evaluator, baselines.learned(rule, implementation="reference"), rule.init_phi(0),
                                 seeds_for("validation", 1), seeds_for("test", 2), baselines=("sgd", "adam"),
                                 grid=(1e-3, 1e-1), log=logged.append)
    assert set(results) == {"lstm", "sgd", "adam", "_raw", "_tuning"}
    assert set(results["_tuning"]) == {"sgd", "adam"}
    for name in ("sgd", "adam"):
        scores = results["_tuning"][name]
        assert list(scores) == [1e-3, 1e-1]
        assert results[name]["learning_rate"] == min(scores, key=scores.get)
        _, expected = evaluation.tune_learning_rate(evaluator, baselines.BASELINES[name](), seeds_for("validation", 1),
                                                    (1e-3, 1e-1))
        assert scores == expected
    assert len(logged) == 2 and "tuned learning rate" in logged[0]
