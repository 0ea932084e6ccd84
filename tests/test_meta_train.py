import os

import numpy as np
import pytest
import tensorflow as tf

from l2l_tf import LSTMUpdateRule, ops
from l2l_tf.problems import ProblemFamily, ProblemInstance, QuadraticFamily, seeds_for
from l2l_tf.training import MetaTrainer as _MetaTrainer

SMALL_RULE = LSTMUpdateRule(4, 3, "none", output_scale=0.1)


def MetaTrainer(rule, family, **kwargs):
    """The meta-trainer on the pure-TF step unless a test asks for another implementation."""
    kwargs.setdefault("implementation", "reference")
    return _MetaTrainer(rule, family, **kwargs)


def flat(rule, tree):
    """A φ-shaped tree (φ, a meta-gradient) as one numpy vector, to compare and to step along directions."""
    return ops.flat_phi(tree, rule.step_config).numpy()


def tree(rule, vector):
    return ops.phi_tree(tf.constant(vector, tf.float32), rule.step_config)


class LinearFamily(ProblemFamily):
    """f(θ) = c·θ: its gradient does not depend on θ, so dropping second derivatives loses nothing."""

    def sample(self, seed):
        rng = np.random.default_rng(seed)
        return ProblemInstance((tf.constant(rng.normal(size=5), tf.float32),), (),
                               tf.constant(rng.normal(size=5), tf.float32))

    def loss(self, params, extra, data, step):
        return tf.reduce_sum(params[0] * data), extra


class NaNFamily(QuadraticFamily):
    """A quadratic whose loss turns NaN after step 4."""

    def loss(self, params, extra, data, step):
        loss, extra = super().loss(params, extra, data, step)
        return tf.where(step > 4, tf.constant(np.nan, tf.float32), loss), extra


def meta_gradient(trainer, phi, seed=0, steps=None):
    problem = trainer.family.sample(seed)
    loss, grad, _ = trainer.meta_gradient(tree(trainer.rule, phi), problem.params, problem.extra,
                                          trainer.rule.init_state(problem.params), problem.data, tf.constant(0))
    return loss, flat(trainer.rule, grad)


def unroll_loss(trainer, phi, seed=0):
    problem = trainer.family.sample(seed)
    phi = phi if isinstance(phi, dict) else tree(trainer.rule, phi)
    return trainer.unroll_loss(phi, problem.params, problem.extra, trainer.rule.init_state(problem.params),
                               problem.data, tf.constant(0))[0]


def test_first_order_meta_gradient_matches_finite_differences():
    trainer = MetaTrainer(SMALL_RULE, LinearFamily(), num_steps=4, unroll_length=4)
    phi = np.random.default_rng(0).normal(0, 0.5, SMALL_RULE.num_params).astype(np.float32)
    _, grad = meta_gradient(trainer, phi)
    direction = np.random.default_rng(1).normal(size=SMALL_RULE.num_params).astype(np.float32)
    direction /= np.linalg.norm(direction)
    eps = 1e-2
    fd = (unroll_loss(trainer, phi + eps * direction) - unroll_loss(trainer, phi - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(np.sum(grad * direction)), float(fd), rtol=2e-3, atol=1e-5)


def test_second_derivatives_change_the_meta_gradient_only_where_they_exist():
    phi = np.random.default_rng(2).normal(0, 0.5, SMALL_RULE.num_params).astype(np.float32)
    for family, should_differ in ((QuadraticFamily(batch_size=4, num_dims=3), True), (LinearFamily(), False)):
        grads = [meta_gradient(MetaTrainer(SMALL_RULE, family, num_steps=5, unroll_length=5,
                                           second_derivatives=second), phi)[1]
                 for second in (False, True)]
        differ = not np.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
        assert differ == should_differ, family


def test_meta_loss_weights_and_unroll_count():
    family = QuadraticFamily(batch_size=4, num_dims=3)
    rule = SMALL_RULE.replace(output_scale=0.0)  # θ never moves: every f(θ_t) equals f(θ_0)
    f0 = float(family.loss(family.sample(0).params, (), family.sample(0).data, 0)[0])
    weights = np.arange(1, 11, dtype=np.float32)
    trainer = MetaTrainer(rule, family, num_steps=10, unroll_length=5, loss_weights=weights)
    loss = unroll_loss(trainer, rule.init_phi())
    np.testing.assert_allclose(float(loss), f0 * weights[:5].sum(), rtol=1e-5)
    np.testing.assert_allclose(trainer.validate([0]), f0, rtol=1e-5)  # Σ w_t f_t / Σ w_t with f_t = f_0
    with pytest.raises(ValueError, match="divide"):
        MetaTrainer(rule, family, num_steps=10, unroll_length=3)


def test_log_meta_loss_sums_log_losses_and_validates_on_them():
    family = QuadraticFamily(batch_size=4, num_dims=3)
    rule = SMALL_RULE.replace(output_scale=0.0)  # θ never moves: every f(θ_t) equals f(θ_0)
    f0 = float(family.loss(family.sample(0).params, (), family.sample(0).data, 0)[0])
    weights = np.arange(1, 11, dtype=np.float32)
    trainer = MetaTrainer(rule, family, num_steps=10, unroll_length=5, loss_weights=weights, meta_loss="log")
    np.testing.assert_allclose(float(unroll_loss(trainer, rule.init_phi())), np.log(f0) * weights[:5].sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(trainer.validate([0]), np.log(f0), rtol=1e-5)
    with pytest.raises(ValueError, match="meta_loss"):
        MetaTrainer(rule, family, num_steps=10, unroll_length=5, meta_loss="mean")


def test_log_meta_gradient_is_the_chain_rule_of_the_sum():
    """d Σ log f_t / dφ = Σ (1/f_t) d f_t / dφ: with one step per unroll, log's gradient is sum's divided by f_1."""
    family = QuadraticFamily(batch_size=4, num_dims=3)
    phi = np.random.default_rng(5).normal(0, 0.5, SMALL_RULE.num_params).astype(np.float32)
    trainers = {kind: MetaTrainer(SMALL_RULE, family, num_steps=1, unroll_length=1, meta_loss=kind)
                for kind in ("sum", "log")}
    (f1, grad_sum), (log_f1, grad_log) = (meta_gradient(trainers[k], phi) for k in ("sum", "log"))
    np.testing.assert_allclose(float(log_f1), np.log(float(f1)), rtol=1e-5)
    np.testing.assert_allclose(grad_log, grad_sum / float(f1), rtol=1e-4, atol=1e-7)


def test_log_validation_of_a_zero_loss_uses_the_training_floor():
    """A loss of exactly 0 is log(LOG_LOSS_FLOOR) in validation as in training, not -inf (scored as diverged)."""
    from l2l_tf.training import LOG_LOSS_FLOOR

    class ZeroFamily(LinearFamily):
        def loss(self, params, extra, data, step):
            return 0.0 * tf.reduce_sum(params[0] * data), extra

    trainer = MetaTrainer(SMALL_RULE, ZeroFamily(), num_steps=4, unroll_length=2, meta_loss="log")
    np.testing.assert_allclose(trainer.validate([0, 1]), np.log(LOG_LOSS_FLOOR), rtol=1e-6)
    np.testing.assert_allclose(float(unroll_loss(trainer, trainer.phi)), 2 * np.log(LOG_LOSS_FLOOR), rtol=1e-5)


def test_checkpoint_of_another_meta_loss_is_refused(tmp_path):
    family = QuadraticFamily(batch_size=4, num_dims=3)
    MetaTrainer(SMALL_RULE, family, num_steps=4, unroll_length=2).save(str(tmp_path))
    with pytest.raises(ValueError, match="written by another run"):
        MetaTrainer(SMALL_RULE, family, num_steps=4, unroll_length=2, meta_loss="log").restore(str(tmp_path))


def test_non_finite_meta_gradient_is_skipped_and_counted():
    trainer = MetaTrainer(SMALL_RULE, NaNFamily(batch_size=4, num_dims=3), num_steps=8, unroll_length=4)
    before = flat(SMALL_RULE, trainer.phi)
    trainer.train_epoch()
    assert trainer.skipped_steps == 1                       # second unroll (steps 4..8) is NaN
    assert np.all(np.isfinite(flat(SMALL_RULE, trainer.phi)))
    assert not np.array_equal(before, flat(SMALL_RULE, trainer.phi))  # the first (finite) unroll was applied


def test_meta_training_learns_quadratics():
    family = QuadraticFamily(batch_size=32, num_dims=10)
    rule = LSTMUpdateRule(preprocess="none", output_scale=1.0)
    trainer = MetaTrainer(rule, family, num_steps=40, unroll_length=20, learning_rate=3e-3, seed=1)
    seeds = seeds_for("validation", 5, 1)
    initial = trainer.validate(seeds)
    trainer.train(150, validation_every=50, verbose=0)
    assert trainer.best_validation < 0.5 * initial, (initial, trainer.history)


def test_checkpoint_resume_is_exact(tmp_path):
    family = QuadraticFamily(batch_size=4, num_dims=3)
    kwargs = dict(num_steps=10, unroll_length=5, seed=3)
    straight = MetaTrainer(SMALL_RULE, family, **kwargs)
    straight.train(6, validation_every=3, num_validation_problems=2, verbose=0)

    first = MetaTrainer(SMALL_RULE, family, **kwargs)
    first.train(3, validation_every=3, num_validation_problems=2, checkpoint_dir=str(tmp_path), verbose=0)
    resumed = MetaTrainer(SMALL_RULE, family, **kwargs)  # a new process would start like this
    resumed.train(6, validation_every=3, num_validation_problems=2, checkpoint_dir=str(tmp_path), verbose=0)
    assert resumed.epoch == 6
    np.testing.assert_allclose(flat(SMALL_RULE, resumed.phi), flat(SMALL_RULE, straight.phi), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(flat(SMALL_RULE, resumed.best_phi), flat(SMALL_RULE, straight.best_phi), rtol=1e-6,
                               atol=1e-8)

    other = MetaTrainer(SMALL_RULE.replace(hidden1=5), family, **kwargs)
    with pytest.raises(ValueError, match="written by another run"):
        other.restore(str(tmp_path))


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = MetaTrainer(SMALL_RULE, QuadraticFamily(batch_size=4, num_dims=3), num_steps=5, unroll_length=5)
    trainer.train(1, validation_every=1, num_validation_problems=1, checkpoint_dir=str(tmp_path), verbose=0)
    saved = open(_MetaTrainer.checkpoint_path(str(tmp_path)), "rb").read()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", killed)
    trainer.train_epoch()
    with pytest.raises(KeyboardInterrupt):
        trainer.save(str(tmp_path))
    assert open(_MetaTrainer.checkpoint_path(str(tmp_path)), "rb").read() == saved
    assert os.listdir(tmp_path) == ["meta_trainer.npz"]  # no temporary file left behind


def test_tensorboard_scalars_and_export(tmp_path):
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    trainer = MetaTrainer(SMALL_RULE, QuadraticFamily(batch_size=4, num_dims=3), num_steps=5, unroll_length=5)
    trainer.train(2, validation_every=1, num_validation_problems=1, logdir=str(tmp_path / "tb"), verbose=0)
    events = EventAccumulator(str(tmp_path / "tb"))  # the run's directory, as TensorBoard loads it (every file)
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"meta_loss", "validation_loss", "skipped_steps", "steps_per_sec"} <= tags
    from l2l_tf import load_phi
    trainer.export(str(tmp_path / "phi.npz"))
    rule, phi, metadata = load_phi(str(tmp_path / "phi.npz"))
    assert rule == SMALL_RULE and metadata["epochs"] == 2
    np.testing.assert_array_equal(flat(rule, phi), flat(rule, trainer.best_phi))


@pytest.mark.parametrize("second_derivatives", [False, True])
def test_meta_gradient_through_the_fused_op_matches_the_reference(second_derivatives):
    from l2l_tf import ops
    if not ops.fused_available():
        pytest.skip("the fused op library is not built")
    family = QuadraticFamily(batch_size=8, num_dims=5)
    rule = LSTMUpdateRule(preprocess="paper", output_scale=0.1)
    phi = np.random.default_rng(4).normal(0, 0.3, rule.num_params).astype(np.float32)
    results = [meta_gradient(MetaTrainer(rule, family, num_steps=10, unroll_length=10, implementation=impl,
                                         second_derivatives=second_derivatives), phi)
               for impl in ("reference", "fused")]
    (loss_ref, grad_ref), (loss_fused, grad_fused) = results
    np.testing.assert_allclose(float(loss_fused), float(loss_ref), rtol=1e-5)
    np.testing.assert_allclose(grad_fused, grad_ref, rtol=1e-3, atol=1e-4 * float(np.abs(grad_ref).max()))


LEGACY = os.path.join(os.path.dirname(__file__), "fixtures", "legacy")


def test_checkpoint_written_before_rules_resumes_like_the_old_code(tmp_path):
    """meta_trainer.npz from the flat-φ code (tests/fixtures/legacy) resumes here: one more epoch gives the φ the
    old code computed from it (Adam's moments split into the leaves like φ)."""
    import shutil
    shutil.copy(os.path.join(LEGACY, "meta_trainer.npz"), tmp_path / "meta_trainer.npz")
    rule = LSTMUpdateRule(5, 4, "none", output_scale=0.5)
    trainer = MetaTrainer(rule, QuadraticFamily(batch_size=4, num_dims=3), num_steps=10, unroll_length=5,
                          learning_rate=1e-2, seed=3)
    trainer.train(3, validation_every=2, num_validation_problems=2, checkpoint_dir=str(tmp_path), verbose=0)
    expected = np.load(os.path.join(LEGACY, "meta_continued.npz"))
    assert trainer.epoch == int(expected["epoch"]) == 3
    np.testing.assert_allclose(flat(rule, trainer.phi), expected["phi"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(flat(rule, trainer.best_phi), expected["best_phi"], rtol=1e-6, atol=1e-7)
    # ... and is written back in today's format, which restores too.
    assert "format_version" in np.load(tmp_path / "meta_trainer.npz").files
    again = MetaTrainer(rule, QuadraticFamily(batch_size=4, num_dims=3), num_steps=10, unroll_length=5,
                        learning_rate=1e-2, seed=3)
    again.restore(str(tmp_path))
    np.testing.assert_array_equal(flat(rule, again.phi), flat(rule, trainer.phi))


def test_a_run_may_resume_with_another_implementation(tmp_path):
    """implementation is a run-time choice: it is not in the checkpoint, so a run resumes with another one."""
    if not ops.fused_available():
        pytest.skip("the fused op library is not built")
    family = QuadraticFamily(batch_size=4, num_dims=3)
    MetaTrainer(SMALL_RULE, family, num_steps=4, unroll_length=2, implementation="fused").train(
        1, validation_every=1, num_validation_problems=1, checkpoint_dir=str(tmp_path), verbose=0)
    import json
    state = json.loads(str(np.load(tmp_path / "meta_trainer.npz")["state"]))
    assert "implementation" not in json.dumps(state)
    resumed = MetaTrainer(SMALL_RULE, family, num_steps=4, unroll_length=2, implementation="reference")
    resumed.restore(str(tmp_path))
    assert resumed.epoch == 1


def test_validation_traces_its_run_once():
    """validate() reuses one traced run (the learned optimizer is built once per trainer), however often it runs."""
    trainer = MetaTrainer(SMALL_RULE, QuadraticFamily(batch_size=4, num_dims=3), num_steps=4, unroll_length=2)
    for _ in range(3):
        trainer.validate([0, 1])
    runs = trainer.validation_evaluator._runs
    assert len(runs) == 1
    assert next(iter(runs.values())).experimental_get_tracing_count() == 1
