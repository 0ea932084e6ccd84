"""Meta-training an update rule by truncated backpropagation through time.

One epoch draws a fresh problem, runs it for `num_steps` optimizee steps in unrolls of `unroll_length`, and takes
one Adam step on φ per unroll. Within an unroll the meta-loss is Σ_t w_t f(θ_t) over its steps t = s+1..s+K; θ and
the LSTM state carry over to the next unroll without gradient across the boundary. With
`second_derivatives=False` (the paper's default) the optimizee gradient enters the LSTM through a stop-gradient, and
the meta-gradient reuses it as ∂f(θ_t)/∂θ_t instead of backpropagating through the optimizee again.
"""
import math
import os
import time

import numpy as np
import tensorflow as tf
import keras

from l2l_tf import baselines, evaluation, ops
from l2l_tf.problems import seeds_for
from l2l_tf.rules import UpdateRule, leaf_paths, save_phi, tree_from_paths
from l2l_tf.training import checkpoints, summaries


# Floor of f(θ_t) under the log meta-loss: keeps it finite when a loss reaches exactly zero.
LOG_LOSS_FLOOR = 1e-12


def _log_loss(loss):
    return tf.math.log(tf.maximum(loss, LOG_LOSS_FLOOR))


# Per-step meta-objective of f(θ_t).
META_LOSSES = {"sum": tf.identity, "log": _log_loss}


def _first_order_term(loss, params, grads):
    """`loss` (f(θ), computed from θ under a stop-gradient) as a function of `params` θ whose gradient is the
    already computed `grads` ∇f(θ): what the meta-loss holds when second derivatives are off."""
    @tf.custom_gradient
    def term(*params):
        def gradient(upstream):
            return [tf.cast(upstream, g.dtype) * g for g in grads]

        return tf.identity(loss), gradient

    return term(*params)


def _variable_name(path):
    return "phi." + path.replace("/", ".")


class MetaTrainer:
    """Truncated-BPTT meta-trainer of an `UpdateRule` on a `ProblemFamily`.

    Args:
        rule: the update rule (any registered `UpdateRule`: its architecture, preprocessing, output scale).
        family: problems to meta-train on (a fresh one each epoch).
        num_steps: optimizee steps per problem, T (paper: 100).
        unroll_length: steps per truncated unroll, K (paper: 20); must divide T.
        loss_weights: w_1..w_T of the meta-loss (default all 1).
        meta_loss: "sum" (paper: Σ_t w_t f(θ_t)) or "log" (Σ_t w_t log f(θ_t), which values a halving of a small
            late loss as much as one of the large early loss; validation then uses the same objective).
        second_derivatives: keep ∂∇f/∂φ (False: stop-gradient on the optimizee gradient, as in the paper).
        learning_rate: Adam learning rate on φ (release: 1e-3): a float or a
            `keras.optimizers.schedules.LearningRateSchedule` of the meta-update count (restored with checkpoints).
        clip_norm: clip the meta-gradient to this global norm over all of φ's leaves (None: no clipping).
        jit_compile: compile each unroll with XLA (the step then uses the pure-TF path).
        phi: initial φ tree (default `rule.init_phi(seed)`).
        seed: seeds φ's initialisation and the training problems.
        validation_family: problems for validation/early stopping (default `family`).
        implementation: how the rule's step runs ("auto", "fused", "reference"): a run-time choice, so a run may
            resume with another one.
        activation_memory: bytes of LSTM activations an unroll may keep for its meta-gradient, so that the gradient
            of the fused op reads them instead of recomputing them (CPU; default 1 GiB: a 100-step MNIST unroll of
            20 keeps 254 MB; 0: recompute everything). Saving changes the forward's rounding by an ulp or two, like
            the implementation choice, and is not part of a checkpoint's fingerprint.
        matmul_precision: "float32" (default) or "bfloat16": the unrolls' LSTM GEMMs, forward and meta-gradient, on
            bfloat16-rounded inputs with float32 sums (`ops.matmul_precision`; the fused CPU op then runs them at
            twice the float32 rate). Validation and evaluation stay float32. A run-time choice like
            `implementation`, not part of a checkpoint's fingerprint.
        run_config: JSON values of whatever else defines the run (a curriculum's phases, the data source, ...):
            part of the fingerprint a checkpoint must match to be resumed (see training/checkpoints.py).
    """

    def __init__(self, rule: UpdateRule, family, *, num_steps=100, unroll_length=20, loss_weights=None,
                 meta_loss="sum", second_derivatives=False, learning_rate=1e-3, clip_norm=None, jit_compile=False,
                 phi=None, seed=0, validation_family=None, implementation="auto", run_config=None,
                 activation_memory=2**30, matmul_precision="float32"):
        if num_steps % unroll_length:
            raise ValueError(f"unroll_length ({unroll_length}) must divide num_steps ({num_steps})")
        self.rule, self.family = rule, family
        self.implementation = rule.check_implementation(implementation)
        self.num_steps, self.unroll_length = int(num_steps), int(unroll_length)
        weights = np.ones(num_steps) if loss_weights is None else np.asarray(loss_weights, np.float64)
        if weights.shape != (num_steps,):
            raise ValueError(f"loss_weights must have {num_steps} entries (one per step), got {weights.shape}")
        self.loss_weights = tf.constant(weights, tf.float32)
        if meta_loss not in META_LOSSES:
            raise ValueError(f"meta_loss must be one of {sorted(META_LOSSES)}, got {meta_loss!r}")
        self.meta_loss = meta_loss
        self.second_derivatives = bool(second_derivatives)
        self.seed = int(seed)
        if activation_memory < 0:
            raise ValueError(f"activation_memory must be >= 0 bytes, got {activation_memory}")
        self.activation_memory = int(activation_memory)
        self.matmul_precision = rule.check_matmul_precision(matmul_precision)
        self.learning_rate, self.clip_norm = learning_rate, clip_norm
        self.run_config = {} if run_config is None else dict(run_config)
        initial = rule.init_phi(seed) if phi is None else rule.as_phi_tree(phi)
        rule.check_phi(initial)
        # One variable per φ leaf, named by its path (Keras variable names may not hold "/").
        self.phi = tree_from_paths([(path, keras.Variable(tf.cast(leaf, tf.float32), name=_variable_name(path)))
                                    for path, leaf in leaf_paths(initial)])
        self.optimizer = keras.optimizers.Adam(learning_rate, global_clipnorm=clip_norm)
        self.optimizer.build(self.phi_variables)
        self.epoch = 0            # epochs completed
        self.skipped_steps = 0    # meta-updates dropped for non-finite meta-gradients
        self.stale_validations = 0  # validations since the best one (early stopping)
        self.resumed_from = None  # the epoch `train` resumed from (None: it started fresh)
        self.best_phi = self.phi_numpy()
        self.best_validation = math.inf
        self.history = []         # (epoch, validation loss)
        self.param_specs = family.param_specs()
        self.learned_optimizer = baselines.learned(rule, implementation=self.implementation)
        self.validation_evaluator = evaluation.Evaluator(validation_family or family, self.num_steps)
        self._meta_step = tf.function(self._meta_step_impl, jit_compile=jit_compile)

    @property
    def phi_variables(self):
        """φ's variables in leaf-path order."""
        return [variable for _, variable in leaf_paths(self.phi)]

    def phi_numpy(self):
        """The current φ as a tree of float32 arrays."""
        return tree_from_paths([(path, np.array(v.numpy())) for path, v in leaf_paths(self.phi)])

    # ---- the differentiable unroll ----
    def unroll_loss(self, phi, params, extra, rule_state, data, start_step):
        """Meta-loss of one unroll from θ_s and the carry (θ_{s+K}, extra, state) for the next one.

        With `second_derivatives=False` each f(θ_t) that ∇f(θ_t) was computed for enters the meta-loss as a term
        whose value is f(θ_t) and whose gradient w.r.t. θ_t is that ∇f(θ_t) (`_first_order_term`): the meta-gradient
        never backpropagates through the optimizee's forward pass a second time. The optimizee runs on θ_t under a
        stop-gradient, so no meta-gradient flows θ_t → extra_{t+1} (batch-norm moving statistics) → later losses;
        that is exact when the loss does not read `extra` (batch norm in training mode, as KerasModelFamily runs
        it). The unroll's last loss, f(θ_{s+K}), is differentiated the ordinary way. `second_derivatives=True`
        differentiates every f(θ_t) and ∇f(θ_t) through the forward pass.
        """
        family, rule = self.family, self.rule
        weights = self.loss_weights[start_step:start_step + self.unroll_length]
        params, total = tuple(params), 0.0
        # The LSTM steps' activations are kept for the meta-gradient (within activation_memory), not recomputed, and
        # the steps share one flat φ (its gradient is then summed in a fixed order: reproducible bit for bit).
        with ops.saving_activations(self.activation_memory), ops.matmul_precision(self.matmul_precision), \
                ops.sharing_flat_phi():
            for k in range(self.unroll_length):
                if self.second_derivatives:
                    loss, grads, extra = evaluation.value_and_grad(family, params, extra, data, start_step + k)
                else:
                    loss, grads, extra = evaluation.value_and_grad(
                        family, tuple(tf.stop_gradient(p) for p in params), extra, data, start_step + k)
                    grads = [tf.stop_gradient(g) for g in grads]
                if k > 0:
                    term = loss if self.second_derivatives else _first_order_term(loss, params, grads)
                    total += weights[k - 1] * self._objective(term)
                updates, rule_state = rule.step(phi, grads, rule_state, implementation=self.implementation)
                params = tuple(p + u for p, u in zip(params, updates))
        final_loss, _ = family.loss(params, extra, data, start_step + self.unroll_length)
        total += weights[self.unroll_length - 1] * self._objective(final_loss)
        return total, (params, extra, rule_state)

    def _objective(self, loss):
        return META_LOSSES[self.meta_loss](loss)

    def meta_gradient(self, phi, params, extra, rule_state, data, start_step):
        """(meta-loss, dL/dφ as a tree like φ, carry) of one unroll."""
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(phi))
            loss, carry = self.unroll_loss(phi, params, extra, rule_state, data, start_step)
        return loss, tape.gradient(loss, phi), carry

    def _meta_step_impl(self, params, extra, rule_state, data, start_step):
        phi = tf.nest.map_structure(tf.convert_to_tensor, self.phi)
        loss, grad, carry = self.meta_gradient(phi, params, extra, rule_state, data, start_step)
        grads = [g for _, g in leaf_paths(grad)]
        norm = tf.linalg.global_norm(grads)  # before clipping; NaN/Inf when any entry is
        finite = tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(norm))
        # A non-finite meta-gradient is never applied: it would corrupt φ (and Adam's moments) for good.
        def apply():
            self.optimizer.apply_gradients(zip(grads, self.phi_variables))
            return tf.constant(True)

        tf.cond(finite, apply, lambda: tf.constant(False))
        return loss, finite, norm, carry

    # ---- epochs ----
    def train_epoch(self):
        """Meta-trains on one fresh problem; returns the mean meta-loss of its unrolls (and sets
        `last_meta_gradient_norm`, the mean norm of its applied meta-gradients)."""
        problem = self.family.sample(seeds_for("train", 1, self.seed)[0] + self.epoch)
        params, extra, data = problem.params, problem.extra, problem.data
        rule_state = self.rule.init_state(self.param_specs)
        losses, norms = [], []
        for start in range(0, self.num_steps, self.unroll_length):
            loss, finite, norm, (params, extra, rule_state) = self._meta_step(
                params, extra, rule_state, data, tf.constant(start))
            if bool(finite):
                norms.append(float(norm))
            else:
                self.skipped_steps += 1
            losses.append(float(loss))
        self.epoch += 1
        self.last_meta_gradient_norm = float(np.mean(norms)) if norms else math.nan
        return float(np.mean(losses))

    def validate(self, seeds):
        """The meta-objective on the validation problems: mean over problems of Σ_t w_t f(θ_t) / Σ_t w_t, t = 1..T
        (log f(θ_t) with meta_loss="log")."""
        losses = self.validation_evaluator.losses(self.learned_optimizer, {"phi": self.phi}, seeds)
        if self.meta_loss == "log":
            losses = np.log(np.maximum(losses, LOG_LOSS_FLOOR))  # the floor of training; NaN stays NaN
        weights = self.loss_weights.numpy().astype(np.float64)
        value = float(np.mean(losses[:, 1:] @ weights) / weights.sum())
        return value if math.isfinite(value) else math.inf

    def train(self, num_epochs, *, validation_every=100, num_validation_problems=20, checkpoint_dir=None,
              checkpoint_every=None, logdir=None, patience=None, verbose=1, restart=False):
        """Meta-trains until `num_epochs` epochs in total have run, resuming from `checkpoint_dir` when it holds a
        checkpoint of this run (`restart=True`: start fresh and overwrite it; a checkpoint of another run, an
        unreadable one or one with a non-finite φ raises `checkpoints.CheckpointError`).

        Validates every `validation_every` epochs on fixed held-out problems and keeps the best φ in `best_phi`;
        stops early after `patience` validations without improvement (None: never; the count is checkpointed).
        Checkpoints (atomically) at every validation and every `checkpoint_every` epochs. TensorBoard (`logdir`):
        meta-loss, validation loss, meta-gradient norm, meta learning rate, skipped meta-steps, steps per second;
        at each validation histograms of φ and of the gradients and updates of the learned optimizer on the first
        validation problem; a resumed run's curves hold each epoch once. Returns `best_phi` as a tree of tensors.
        """
        for name, value in (("validation_every", validation_every), ("num_validation_problems",
                                                                      num_validation_problems)):
            if not (isinstance(value, (int, np.integer)) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if checkpoint_every is not None and not (isinstance(checkpoint_every, (int, np.integer))
                                                 and checkpoint_every >= 1):
            raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
        validation_seeds = seeds_for("validation", num_validation_problems, self.seed)
        self.resumed_from = None
        if checkpoint_dir and not restart and os.path.exists(self.checkpoint_path(checkpoint_dir)):
            self.restore(checkpoint_dir)
            self.resumed_from = self.epoch
            if verbose:
                print(f"resumed from epoch {self.epoch} ({self.checkpoint_path(checkpoint_dir)})", flush=True)
        writer = None
        if logdir:
            summaries.mark_restart(logdir, self.epoch + 1)  # drops what an interrupted run logged after its checkpoint
            writer = tf.summary.create_file_writer(logdir)
        progress = keras.utils.Progbar(num_epochs, verbose=verbose, stateful_metrics=["validation", "skipped"])
        progress.update(self.epoch)
        while self.epoch < num_epochs:
            started = time.perf_counter()
            meta_loss = self.train_epoch()
            steps_per_sec = self.num_steps / (time.perf_counter() - started)
            values = [("meta_loss", meta_loss), ("skipped", self.skipped_steps)]
            scalars = {"meta_loss": meta_loss, "skipped_steps": self.skipped_steps, "steps_per_sec": steps_per_sec,
                       "meta_gradient_norm": self.last_meta_gradient_norm,
                       "meta_learning_rate": float(self.optimizer.learning_rate)}
            validated = self.epoch % validation_every == 0 or self.epoch == num_epochs
            if validated:
                validation = self.validate(validation_seeds)
                self.history.append((self.epoch, validation))
                if validation < self.best_validation:
                    self.best_validation, self.best_phi, self.stale_validations = validation, self.phi_numpy(), 0
                else:
                    self.stale_validations += 1
                scalars["validation_loss"] = validation
                values.append(("validation", validation))
            if writer:
                with writer.as_default(step=self.epoch):
                    for name, value in scalars.items():
                        tf.summary.scalar(name, value)
                    if validated:
                        self._log_validation_histograms(validation_seeds[0])
            progress.update(self.epoch, values)
            if checkpoint_dir and (validated or (checkpoint_every and self.epoch % checkpoint_every == 0)):
                if writer:
                    writer.flush()  # what TensorBoard shows never runs ahead of the checkpoint by more than needed
                self.save(checkpoint_dir)
            if patience is not None and self.stale_validations > patience:
                if verbose:
                    print(f"early stopping at epoch {self.epoch}: no improvement in {self.stale_validations} "
                          "validations")
                break
        if writer:
            writer.flush()
        return tf.nest.map_structure(tf.constant, self.best_phi)

    def _log_validation_histograms(self, seed):
        """φ, and the gradients and updates of the learned optimizer on validation problem `seed` (inside a
        writer's `as_default(step=...)`)."""
        summaries.log_phi(self.phi, self.epoch)
        family = self.validation_evaluator.family
        phi = tf.nest.map_structure(tf.convert_to_tensor, self.phi)
        _, gradients, updates = summaries.trajectory(family, self.rule, phi, family.sample(seed), self.num_steps,
                                                     self.implementation)
        summaries.log_trajectory(family, gradients, updates, self.epoch, prefix="validation_problem/")

    # ---- checkpoints ----
    @staticmethod
    def checkpoint_path(directory):
        return checkpoints.checkpoint_path(directory)

    def save(self, directory):
        """Writes the full training state to `directory/meta_trainer.npz` (temporary file, then rename)."""
        checkpoints.save(self, directory)

    def restore(self, directory):
        """Loads the state written by `save` (or by the flat-φ code before rules/); `checkpoints.CheckpointError`
        (a ValueError) when it belongs to another run, is unreadable or holds a non-finite φ."""
        checkpoints.restore(self, directory)

    def export(self, path, **metadata):
        """Writes the best φ in the `save_phi` format (what `LearnedOptimizer` and `from_pretrained` load)."""
        save_phi(path, self.rule, self.best_phi, best_validation=self.best_validation, epochs=self.epoch, **metadata)
