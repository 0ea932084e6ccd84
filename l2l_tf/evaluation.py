"""Running optimizers on held-out problems: loss curves, learning-rate tuning, summaries.

Every optimizer is run on the same problems (same seeds, hence the same θ_0 and minibatches) and its state is
re-initialised for each problem.
"""
import math

import numpy as np
import tensorflow as tf

from l2l_tf.baselines import BASELINES, DEFAULT_LR_GRID, FunctionalOptimizer


def value_and_grad(family, params, extra, data, step):
    """(f(θ), ∇f(θ), new extra) of one problem at one step."""
    with tf.GradientTape() as tape:
        tape.watch(params)
        loss, new_extra = family.loss(params, extra, data, step)
    grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss, grads, new_extra


class Evaluator:
    """Runs FunctionalOptimizers for `num_steps` steps on problems of `family` and records f(θ_t), t = 0..T.

    Args:
        family: a ProblemFamily.
        num_steps: T.
        jit_compile: compile the run with XLA (the learned optimizer then uses the pure-TF step).
    """

    def __init__(self, family, num_steps, jit_compile=False):
        self.family, self.num_steps, self.jit_compile = family, int(num_steps), jit_compile
        self.param_specs = family.param_specs()
        self._runs = {}  # FunctionalOptimizer (held, so never confused with a later one) → its traced run

    def _run_fn(self, optimizer: FunctionalOptimizer):
        if optimizer not in self._runs:
            family, num_steps, specs = self.family, self.num_steps, self.param_specs

            def run(hparams, params, extra, data):
                state = optimizer.init(params, specs)
                losses = tf.TensorArray(tf.float32, size=num_steps + 1)

                def body(step, params, extra, state, losses):
                    loss, grads, extra = value_and_grad(family, params, extra, data, step)
                    updates, state = optimizer.update(hparams, list(grads), state, params)
                    params = tuple(p + u for p, u in zip(params, updates))
                    return step + 1, params, extra, state, losses.write(step, loss)

                _, params, extra, _, losses = tf.while_loop(
                    lambda step, *_: step < num_steps, body, (tf.constant(0), tuple(params), tuple(extra), state, losses))
                final_loss, _ = family.loss(params, extra, data, tf.constant(num_steps))
                return losses.write(num_steps, final_loss).stack()

            self._runs[optimizer] = tf.function(run, jit_compile=self.jit_compile)
        return self._runs[optimizer]

    def losses(self, optimizer: FunctionalOptimizer, hparams, seeds):
        """float64 array [len(seeds), T + 1] of f(θ_t) on the problems drawn from `seeds`."""
        run = self._run_fn(optimizer)
        hparams = tf.nest.map_structure(lambda v: tf.convert_to_tensor(v, tf.float32), hparams)
        rows = []
        for seed in seeds:
            problem = self.family.sample(seed)
            rows.append(run(hparams, problem.params, problem.extra, problem.data).numpy())
        return np.asarray(rows, np.float64)


def final_loss_score(losses):
    """Mean final loss over problems, +inf when any run diverged (NaN/Inf)."""
    final = losses[:, -1]
    return float(np.mean(final)) if np.all(np.isfinite(final)) else math.inf


def tune_learning_rate(evaluator, optimizer, seeds, grid=DEFAULT_LR_GRID):
    """(best learning rate, {lr: mean final loss}) over `grid` on the problems from `seeds`."""
    scores = {lr: final_loss_score(evaluator.losses(optimizer, {"learning_rate": lr}, seeds)) for lr in grid}
    best = min(scores, key=scores.get)
    if not math.isfinite(scores[best]):
        raise RuntimeError(f"{optimizer.name}: every learning rate in {grid} diverged")
    return best, scores


def summarize(losses, learning_rate=None):
    """The results.json entry of one optimizer: mean curve, final mean/std, and the spread over problems at each
    step (the 25% and 75% quantiles, "q25"/"q75", what figures shade around the mean)."""
    losses = np.asarray(losses)
    return {"learning_rate": learning_rate,
            "mean_loss": [float(x) for x in np.mean(losses, axis=0)],
            "final_loss_mean": float(np.mean(losses[:, -1])),
            "final_loss_std": float(np.std(losses[:, -1])),
            "q25": [float(x) for x in np.quantile(losses, 0.25, axis=0)],
            "q75": [float(x) for x in np.quantile(losses, 0.75, axis=0)]}


def compare(evaluator, learned_optimizer, phi, validation_seeds, test_seeds, baselines=("sgd", "nag", "rmsprop", "adam"),
            grid=DEFAULT_LR_GRID, tuning_evaluator=None, log=print):
    """Tunes each baseline's learning rate on the validation problems, then runs every optimizer on the test problems.

    `tuning_evaluator` (default: `evaluator`) may hold the validation family when it differs from the test one.
    Returns {"lstm"|baseline: summarize(...)} plus the raw loss arrays under "_raw" and each baseline's tuning
    scores under "_tuning" ({name: {learning rate: mean validation final loss (inf: diverged)}}, grid order).
    """
    tuning_evaluator = tuning_evaluator or evaluator
    results, raw, tuning = {}, {}, {}
    raw["lstm"] = evaluator.losses(learned_optimizer, {"phi": phi}, test_seeds)
    results["lstm"] = summarize(raw["lstm"])
    for name in baselines:
        optimizer = BASELINES[name]()
        lr, scores = tune_learning_rate(tuning_evaluator, optimizer, validation_seeds, grid)
        tuning[name] = scores
        log(f"{name}: tuned learning rate {lr:g} (validation final loss by lr: "
            + ", ".join(f"{k:g}: {v:.4g}" for k, v in scores.items()) + ")")
        raw[name] = evaluator.losses(optimizer, {"learning_rate": lr}, test_seeds)
        results[name] = summarize(raw[name], lr)
    results["_raw"] = raw
    results["_tuning"] = tuning
    return results
