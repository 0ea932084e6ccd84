"""`LearnedOptimizer`: any update rule (l2l_tf.rules) as a Keras 3 optimizer.

    model.compile(optimizer=LearnedOptimizer.from_pretrained("quadratic"), loss="mse")
    model.fit(x, y)

φ is stored as optimizer variables, one per leaf, named by its path ("phi.lstm1.w"), and so is the rule's state:
its shared parts, then each model variable's per-coordinate parts (for the LSTM one [S, size] slot per variable,
rows h1 | c1 | h2 | c2, one column per coordinate), so that `.keras` files and `tf.train.Checkpoint`s carry them.
One optimizer step is exactly the rule's `step` on all variables with dense gradients, times `learning_rate` (φ
read once per step); a coordinatewise rule steps the touched rows of sparse gradients, any other rule sees them dense.
A step whose gradients hold NaN or inf is skipped whole (`skip_nonfinite`, on by default) and counted in
`skipped_steps`. `keras.optimizers.get("LearnedOptimizer")` works like any registered Keras optimizer (with an
untrained φ, as `from_config` gives: φ travels in `.keras` files and checkpoints, not in configs).
"""
import math
import numbers
import os
import pathlib
import sys
import threading
import warnings

import keras
import numpy as np
import tensorflow as tf

from l2l_tf import ops
from l2l_tf.rules import (LSTMUpdateRule, RuleState, UpdateRule, leaf_paths, load_phi, param_specs, rule_from_config,
                          rule_to_config, tree_from_paths)

# Where `from_pretrained` looks for <name>.npz (files written by `save_phi`). A module attribute so that tests and
# users with their own collection can point it elsewhere.
PRETRAINED_DIR = pathlib.Path(__file__).resolve().parent / "pretrained"

STATE_DTYPES = ("float32", "bfloat16", "float16")
_LSTM_FIELDS = ("hidden1", "hidden2", "preprocess", "preprocess_param", "output_scale")

# Keras modules whose `load...` functions deserialize an optimizer and then restore its variables from the same file
# (`.keras` and legacy `.h5`): `from_config` called from inside one of them gets φ right after, so no warning then.
_KERAS_LOADING_MODULES = ("keras.src.saving.saving_lib", "keras.src.legacy.saving.legacy_h5_format")
# `.from_config` is True while `from_config` constructs: its own warning replaces __init__'s.
_construction = threading.local()


def available_pretrained():
    """Names accepted by `LearnedOptimizer.from_pretrained` (the .npz files in `PRETRAINED_DIR`), sorted."""
    directory = pathlib.Path(PRETRAINED_DIR)
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.npz") if p.is_file())


def _standardize_state_dtype(state_dtype):
    try:
        name = keras.backend.standardize_dtype(state_dtype)
    except Exception:
        name = None
    if name not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype!r}")
    return name


def _config_differences(file_rule, rule):
    """Human-readable list of the configuration entries where `rule` differs from the file's."""
    if type(file_rule) is not type(rule):
        return [f"rule {file_rule.name!r} in the file vs {rule.name!r} given"]
    ours, theirs = file_rule.get_config(), rule.get_config()
    diffs = []
    for key in ours:
        a, b = ours[key], theirs.get(key)
        same = math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) if isinstance(a, float) and isinstance(b, float) \
            else a == b
        if not same:
            diffs.append(f"{key}={a!r} in the file vs {b!r} given")
    return diffs


def _resolve_rule(rule, lstm_args):
    """The rule from `rule` (an UpdateRule or a `rule_to_config` dict) and the plain-LSTM keyword arguments."""
    given = {k: v for k, v in lstm_args.items() if v is not None}
    if rule is None:
        return LSTMUpdateRule(**given)
    if isinstance(rule, dict):
        rule = rule_from_config(rule)
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"rule must be an UpdateRule or its config dict, got {type(rule).__name__}")
    if given:
        if not isinstance(rule, LSTMUpdateRule):
            raise ValueError(f"{sorted(given)} configure the plain LSTM rule; the {rule.name!r} rule takes its "
                             "configuration from `rule`")
        diffs = _config_differences(rule, LSTMUpdateRule(**{**rule.get_config(), **given}))
        if diffs:
            raise ValueError("the LSTM arguments differ from `rule`: " + "; ".join(
                d.replace("in the file", "in rule") for d in diffs))
    return rule


def _slot_name(variable, path):
    name = _variable_name(variable).replace("/", "_").replace(":", "_")
    return f"{name}_lstm_state" if path == "" else f"{name}_state.{path.replace('/', '.')}"


@keras.saving.register_keras_serializable(package="l2l_tf")
class LearnedOptimizer(keras.optimizers.Optimizer):
    """Optimizer that applies a learned update rule (Andrychowicz et al., 2016), by default the coordinatewise LSTM.

    For every model variable θ with gradient ∇ and rule state h (the LSTM: one small 2-layer LSTM shared by all
    coordinates):

        u, h ← rule.step(φ, ∇, h)
        θ ← θ + learning_rate · u                  (the LSTM's u = output_scale · LSTM_φ(preprocess(∇)))

    The rule was meta-trained as it is, so keep its configuration (e.g. `output_scale`) at the values φ was trained
    with and use `learning_rate` (1.0 = the rule as trained; a float, a
    `keras.optimizers.schedules.LearningRateSchedule` or a callable) to shrink, grow or schedule the steps.
    Note the base class's `weight_decay` is also multiplied by `learning_rate` (θ ← θ − lr·wd·θ).

    State: the rule's `init_state` for the model's variables, zero at the start (the LSTM: one slot per model
    variable, shape [S, size] with S = 2·(hidden1 + hidden2)). The rule's math runs in float32: gradients of
    float16/bfloat16/float64 variables are cast to float32 and the update is cast back to the variable's dtype;
    floating state is stored in `state_dtype`.

    Stepping: one call of the rule's `step` for all variables with dense gradients per optimizer step (Keras'
    `_backend_update_step`), so a rule that is not coordinatewise reads and writes state shared across coordinates
    and sees every gradient (sparse ones densified).

    Non-finite gradients (`skip_nonfinite=True`, the default): when any gradient of a step holds NaN or inf (e.g. a
    batch with NaN inputs), the whole step is skipped, as a loss-scale optimizer skips one: no model variable, rule
    state, EMA or gradient accumulator changes and `iterations` does not advance (so a learning-rate schedule does
    not either); `skipped_steps` (an optimizer variable, saved with the others) counts the skipped steps. The step is
    decided on the gradients as given to `apply`, before clipping and weight decay. With
    `gradient_accumulation_steps=N`, a micro-batch with a non-finite gradient is dropped whole: it is not added to
    the accumulators and does not count toward the N, so each accumulated step averages N finite micro-batches (and
    `skipped_steps` counts dropped micro-batches). Inside `keras.optimizers.LossScaleOptimizer` (mixed precision)
    the wrapper skips non-finite steps first (and lowers its loss scale); this optimizer then only sees finite
    gradients, so its `skipped_steps` stays 0. Under a `tf.distribute` strategy all replicas skip together.

    Warnings: a φ that is untrained (`phi=None`) or fresh from a config (`from_config`, `keras.optimizers.get`,
    `keras.optimizers.deserialize`: configs do not carry φ) gives a UserWarning; loading a `.keras` file does not
    (`from_config` runs there too, but the saved φ is restored right after; if it is not, the first step warns).

    Sparse gradients (`tf.IndexedSlices`, e.g. from `Embedding`) with a coordinatewise rule: duplicate indices are
    summed first (the same gradient the dense path would see for those rows); then only the touched rows take a
    step: their coordinates are updated and their state columns advance, while untouched rows keep both their
    values and their state, as if their step had been skipped. (Inside XLA compilation the same result is computed
    with a dense masked step, since XLA needs static shapes.)

    Args:
        phi: the rule's weights: None (a fresh `rule.init_phi(phi_seed)`, untrained), a φ tree (nested dict of
            arrays or tensors; for the LSTM also the flat [P] vector of files before format version 2), or the
            path of a φ file written by `save_phi`, whose stored rule must equal this optimizer's;
            `LearnedOptimizer.from_file(path)` / `from_pretrained(name)` take the file's rule instead.
        hidden1, hidden2, preprocess, preprocess_param, output_scale: the plain LSTM rule's arguments (defaults
            20, 20, "paper", the form's default, 0.1), when `rule` is not given; with a `rule` they may be given
            only if they equal its values.
        learning_rate: multiplies the update; defaults to 1.0 (the rule as trained).
        state_dtype: storage dtype of the floating state: "float32" (default), "bfloat16" or "float16". The
            state is computed in float32 and rounded when stored.
        implementation: how the step runs: "auto" (the fused op when built and the rule supports it, the pure-TF
            path inside XLA compilation or when the op is missing), "fused" (error if not built, for a rule the
            op cannot run, or under `jit_compile=True`) or "reference". A run-time choice: saved with the
            optimizer's config, but a `.keras` file saved with "fused" loads as "auto" (with a warning) where the
            op is missing.
        phi_seed: seed of the fresh φ when `phi` is None (also used by `from_config`, before saved
            variables are loaded).
        name: the optimizer's name.
        rule: the update rule: an `UpdateRule` (e.g. `Partitioned(...)`) or its `rule_to_config` dict; default
            the plain LSTM of the arguments above.
        skip_nonfinite: skip every step whose gradients hold NaN or inf (default True; see above). False applies
            such a step like any other, which writes NaN into the variables and the rule's state.
        matmul_precision: "float32" (default) or "bfloat16": the LSTM's gate GEMMs on bfloat16-rounded inputs with
            float32 sums (`ops.matmul_precision`). The fused CPU op runs them with AVX512_BF16 dot products: its
            forward takes ~27% less time at a million coordinates (README: the step table); the updates move by
            ~0.1-0.3% of their size. With implementation="fused" the op built without AVX512_BF16, and the GPU op,
            raise; the pure-TF path (`reference`, or "auto" under XLA or where the CPU op lacks AVX512_BF16)
            emulates the rounding, which is slower than float32. A rule without the LSTM's GEMMs refuses
            "bfloat16". A run-time choice, saved with the optimizer's config.
        **kwargs: the usual Keras optimizer arguments: weight_decay, clipnorm, clipvalue, global_clipnorm,
            use_ema, ema_momentum, ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps.

    Raises:
        FileNotFoundError: `phi` names a missing file.
        ValueError: a bad φ (unreadable or malformed file, wrong shape for the rule, non-finite values, a file
            whose rule differs), a bad rule argument, a bad `state_dtype` or `matmul_precision`.
        TypeError: `phi` or `rule` of an unsupported type; (at build/update time) a non-floating variable or
            gradient.
        RuntimeError: implementation="fused" without the compiled op.
    """

    def __init__(
        self,
        phi=None,
        hidden1=None,
        hidden2=None,
        preprocess=None,
        preprocess_param=None,
        output_scale=None,
        learning_rate=1.0,
        state_dtype="float32",
        implementation="auto",
        phi_seed=0,
        name="learned_optimizer",
        rule=None,
        skip_nonfinite=True,
        matmul_precision="float32",
        **kwargs,
    ):
        # Validate everything before any variable exists.
        rule = _resolve_rule(rule, dict(hidden1=hidden1, hidden2=hidden2, preprocess=preprocess,
                                        preprocess_param=preprocess_param, output_scale=output_scale))
        rule.check_implementation(implementation)
        state_dtype = _standardize_state_dtype(state_dtype)
        rule.check_matmul_precision(matmul_precision)
        phi_value, phi_metadata = self._resolve_phi(phi, rule, phi_seed)
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)  # Keras wants a Python float (1, np.float32(0.5) are fine too)

        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self._rule = rule
        self.implementation = implementation
        self.state_dtype = state_dtype
        self.phi_seed = phi_seed
        self.phi_metadata = phi_metadata
        self.skip_nonfinite = bool(skip_nonfinite)
        self.matmul_precision = matmul_precision
        self._phi_restore_pending = False  # set by `from_config` during a Keras file load, cleared when φ is restored
        self._slots = []          # per model variable: {leaf path: state variable} of its per-coordinate state
        self._slot_templates = []  # per model variable: the per-coordinate state's structure (to repack)
        self._shared = {}         # {leaf path: variable} of the shared state
        self._shared_template = ()
        self._deferred_slot_values = None
        # Before φ: its position after iterations (and learning_rate) is told apart from the φ leaf (float32) that
        # stood there in files written before it existed (see `_upgrade_store`).
        self._skipped_steps = self.add_variable(shape=(), initializer="zeros", dtype="int", name="skipped_steps",
                                                aggregation="only_first_replica")
        self._phi = tree_from_paths([
            (path, self.add_variable(shape=tuple(value.shape), initializer=_ConstantArray(value), dtype="float32",
                                     name="phi." + path.replace("/", ".")))
            for path, value in leaf_paths(phi_value)])
        # iteration (+ learning_rate) + skipped_steps + φ leaves: what exists before `build`; `.keras` stores
        # variables by position.
        self._num_unbuilt_variables = len(self.variables)
        if phi is None and not getattr(_construction, "from_config", False):
            warnings.warn(
                f"LearnedOptimizer: φ is untrained (rule.init_phi({phi_seed!r}), random weights), so its steps are "
                "not a learned optimizer's. For trained weights use LearnedOptimizer.from_pretrained(name) (available: "
                f"{', '.join(available_pretrained()) or 'none'}) or LearnedOptimizer.from_file(path), or pass phi=.",
                UserWarning, stacklevel=2)

    # ---- construction helpers ----
    @staticmethod
    def _resolve_phi(phi, rule, phi_seed):
        """(φ tree of float32 numpy arrays, metadata dict) from the `phi` argument."""
        if phi is None:
            value, metadata = rule.init_phi(phi_seed), {}
        elif isinstance(phi, (str, os.PathLike)):
            file_rule, value, metadata = load_phi(phi)
            diffs = _config_differences(file_rule, rule)
            if diffs:
                raise ValueError(
                    f"φ file {os.fspath(phi)!r} does not match this optimizer's configuration: {'; '.join(diffs)}. "
                    "Pass the file's values, or use LearnedOptimizer.from_file(path) to take them from the file "
                    "(rescale steps with learning_rate, not output_scale).")
        else:
            if isinstance(phi, keras.Variable):
                phi = phi.numpy()
            if not (isinstance(phi, (dict, np.ndarray, list, tuple)) or tf.is_tensor(phi)):
                raise TypeError(f"phi must be None, a path to a save_phi file, or a φ tree of shapes "
                                f"{rule.phi_shapes()}; got {type(phi).__name__}")
            value, metadata = _float_tree(rule, phi), {}
        tree = rule.as_phi_tree(value)
        rule.check_phi(tree)
        arrays = [(path, np.asarray(leaf, np.float32)) for path, leaf in leaf_paths(tree)]
        if not all(np.all(np.isfinite(a)) for _, a in arrays):
            raise ValueError("phi holds non-finite values (NaN or inf)")
        return tree_from_paths(arrays), dict(metadata)

    @classmethod
    def from_file(cls, path, **kwargs):
        """An optimizer with the φ and the rule stored in `path` (a φ file written by `save_phi`).

        `kwargs` go to the constructor (learning_rate, state_dtype, implementation, name, clipnorm, ...). LSTM
        arguments (hidden1, hidden2, preprocess, preprocess_param, output_scale) may be given but must equal the
        file's: φ is only meaningful with the rule it was trained with.
        """
        file_rule, _, _ = load_phi(path)
        given = {field: kwargs.pop(field) for field in _LSTM_FIELDS if kwargs.get(field) is not None}
        if given and not isinstance(file_rule, LSTMUpdateRule):
            raise ValueError(f"{sorted(given)} configure the plain LSTM rule; {os.fspath(path)!r} holds a "
                             f"{file_rule.name!r} rule")
        diffs = _config_differences(file_rule, file_rule.replace(**given)) if given else []
        if diffs:
            raise ValueError(f"φ file {os.fspath(path)!r} does not match this optimizer's configuration: "
                             f"{'; '.join(diffs)}")
        return cls(phi=path, rule=file_rule, **kwargs)

    @classmethod
    def from_pretrained(cls, name, **kwargs):
        """An optimizer with a φ shipped in `l2l_tf/pretrained/<name>.npz` (see `available_pretrained()`).

        `kwargs` as in `from_file`. Raises ValueError for an unknown name, listing the available ones.
        """
        available = available_pretrained()
        if not isinstance(name, str) or name not in available:
            listing = ", ".join(repr(n) for n in available) if available else "none are installed"
            raise ValueError(f"unknown pretrained optimizer {name!r}; available: {listing} "
                             f"(looked in {os.fspath(PRETRAINED_DIR)})")
        return cls.from_file(pathlib.Path(PRETRAINED_DIR) / f"{name}.npz", **kwargs)

    # ---- inspection ----
    @property
    def rule(self):
        """The `UpdateRule` this optimizer applies (its configuration; φ is `self.phi`)."""
        return self._rule

    @property
    def phi(self):
        """φ as a tree of float32 variables, one per leaf (assign to them, or use `set_phi`, to swap weights)."""
        return self._phi

    @property
    def skipped_steps(self):
        """The number of steps skipped for non-finite gradients (an int variable; see `skip_nonfinite`)."""
        return self._skipped_steps

    def phi_value(self):
        """φ as a tree of float32 tensors."""
        return tree_from_paths([(path, tf.convert_to_tensor(v.value)) for path, v in leaf_paths(self._phi)])

    def set_phi(self, phi):
        """Assigns new weights (a φ tree, or anything the `phi` argument takes but None) to φ's variables."""
        tree, _ = self._resolve_phi(phi, self._rule, self.phi_seed) if phi is not None else (None, None)
        if tree is None:
            raise ValueError("set_phi needs a φ (a tree, an array or a φ file path)")
        for (_, variable), (_, value) in zip(leaf_paths(self._phi), leaf_paths(tree)):
            variable.assign(value)
        self._phi_restore_pending = False

    def state_slot(self, variable):
        """The per-coordinate state of a model variable (after `build`): for the LSTM its [S, size] variable,
        for other rules the nest of state variables."""
        if not self.built:
            raise ValueError("the optimizer is not built yet: call build(variables) or train first")
        index = self._get_variable_index(variable)
        slots = self._slots[index]
        if slots is None:
            return None
        return tf.nest.pack_sequence_as(self._slot_templates[index], [slots[p] for p, _ in
                                                                       leaf_paths(self._slot_templates[index])])

    @property
    def shared_state(self):
        """The shared state's variables (a nest; () for rules without shared state)."""
        return self._pack(self._shared_template, self._shared)

    def reset_state(self):
        """Zeroes the rule's state (e.g. before optimizing a new problem with the same optimizer)."""
        for slot in self._state_variables():
            slot.assign(tf.zeros(slot.shape, slot.dtype))

    def _state_variables(self):
        return list(self._shared.values()) + [v for slots in self._slots if slots for v in slots.values()]

    # ---- Keras optimizer API ----
    def apply(self, grads, trainable_variables=None):
        """Keras' `apply` (clipping, weight decay, the step, EMA, gradient accumulation, constraints, the step
        counter), all of it skipped when a gradient holds NaN or inf (`skip_nonfinite`): then only `skipped_steps`
        advances. Works eagerly, in `tf.function`s and under XLA (the choice is a `tf.cond`)."""
        self._warn_if_phi_not_restored()
        grads = list(grads)
        if not self.skip_nonfinite or not grads:
            return super().apply(grads, trainable_variables)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            if not self.built:  # create the variables here, not inside a branch of the tf.cond below
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True
        keras_apply = super().apply

        def step():
            keras_apply(grads, trainable_variables)

        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            replica_context = tf.distribute.get_replica_context()
            if not tf.__internal__.distribute.strategy_supports_no_merge_call():
                # As keras' LossScaleOptimizer: a cond in a replica context must not hold merge_calls (the step's
                # all-reduce, weight decay), so decide in the cross-replica context.
                def decide(distribution):
                    finite = distribution.extended.call_for_each_replica(_all_finite, args=(grads,))
                    finite = tf.reduce_all(tf.stack(distribution.experimental_local_results(finite)))
                    tf.cond(finite, lambda: distribution.extended.call_for_each_replica(step), self._count_skipped)

                replica_context.merge_call(decide)
                return
            # All replicas must take the same branch (the step all-reduces the gradients).
            nonfinite = replica_context.all_reduce(tf.distribute.ReduceOp.SUM,
                                                   tf.cast(tf.logical_not(_all_finite(grads)), tf.int32))
            finite = tf.equal(nonfinite, 0)
        else:
            finite = _all_finite(grads)
        tf.cond(finite, step, self._count_skipped)

    def _count_skipped(self):
        self._skipped_steps.assign_add(1)

    def _warn_if_phi_not_restored(self):
        if self._phi_restore_pending:
            self._phi_restore_pending = False
            warnings.warn(f"optimizer {self.name!r} was deserialized while loading a Keras file but its φ was not "
                          f"restored from it: it steps with a fresh, untrained φ (rule.init_phi({self.phi_seed!r}))",
                          UserWarning, stacklevel=3)

    def build(self, var_list):
        """Creates the rule's state as optimizer variables: shared parts, then each variable's per-coordinate parts
        (φ already exists)."""
        if self.built:
            return
        for variable in var_list:
            dtype = tf.as_dtype(keras.backend.standardize_dtype(variable.dtype))
            if not dtype.is_floating:
                raise TypeError(
                    f"LearnedOptimizer only updates floating-point variables; {_variable_name(variable)!r} has "
                    f"dtype {dtype.name}")
        super().build(var_list)
        with tf.init_scope():  # build may run while a train step is traced: the initial state must be concrete
            state = self._rule.init_state(param_specs(var_list))
        self._shared_template = state.shared
        self._shared = {path: self._state_variable(value, "shared_state." + path.replace("/", "."))
                        for path, value in _leaves(state.shared)}
        self._slots, self._slot_templates = [], []
        for variable, entry in zip(var_list, state.per_coordinate):
            self._slot_templates.append(entry)
            if self._overwrite_variable_with_gradient(variable):
                self._slots.append(None)
                continue
            self._slots.append({path: self._state_variable(value, _slot_name(variable, path))
                                for path, value in _leaves(entry)})
        if self._deferred_slot_values is not None:
            self._restore_deferred()

    def _state_variable(self, value, name):
        dtype = self.state_dtype if tf.as_dtype(value.dtype).is_floating else tf.as_dtype(value.dtype).name
        return self.add_variable(shape=tuple(value.shape), initializer=_ConstantArray(value, dtype), dtype=dtype,
                                 name=name)

    @staticmethod
    def _pack(template, variables):
        """The nest `template` with each leaf read from `variables` (by leaf path) in float32."""
        values = [_read(variables[path]) for path, _ in _leaves(template)]
        return tf.nest.pack_sequence_as(template, values) if values else template

    def _write(self, variables, template, value):
        for (path, _), new in zip(_leaves(template), tf.nest.flatten(value)):
            self.assign(variables[path], tf.cast(new, variables[path].dtype))

    def _check_gradient(self, gradient, variable):
        grad_dtype = tf.as_dtype(gradient.dtype)
        if not grad_dtype.is_floating:
            raise TypeError(f"LearnedOptimizer needs floating-point gradients; got {grad_dtype.name} for "
                            f"{_variable_name(variable)!r}")

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """One rule step for all variables with dense gradients (φ read once per step, and a rule that is not
        coordinatewise sees every gradient); a coordinatewise rule steps the touched rows of sparse gradients."""
        with ops.matmul_precision(self.matmul_precision):  # read where the rule's steps are built, below
            self._step_all(grads, trainable_variables, learning_rate)

    def _step_all(self, grads, trainable_variables, learning_rate):
        for grad, variable in zip(grads, trainable_variables):
            self._check_gradient(grad, variable)
        pairs = [(g, v) for g, v in zip(grads, trainable_variables)]
        if tf.distribute.has_strategy():  # Keras' reduction of replica gradients (identity without a strategy)
            pairs = self._all_reduce_sum_gradients(pairs)
        lr = tf.cast(learning_rate, tf.float32)
        phi = self.phi_value()
        shared = self._pack(self._shared_template, self._shared)
        rows_only = self._rule.coordinatewise
        dense = [(g, v) for g, v in pairs if not (rows_only and isinstance(g, tf.IndexedSlices))]
        for gradient, variable in pairs:
            if rows_only and isinstance(gradient, tf.IndexedSlices):
                index = self._get_variable_index(variable)
                # Under XLA (jit_compile) static shapes are needed: a dense masked step instead of gather/scatter.
                self._sparse_update(gradient, variable, self._slots[index], self._slot_templates[index], shared, lr,
                                    phi, dense=ops.inside_xla_compilation())
        if not dense:
            return
        indices = [self._get_variable_index(v) for _, v in dense]
        per_coordinate = tuple(self._pack(self._slot_templates[i], self._slots[i]) for i in indices)
        updates, state = self._rule.step(
            phi, [tf.cast(_dense(g, v), tf.float32) for g, v in dense],  # IndexedSlices densified
            RuleState(per_coordinate, shared), implementation=self.implementation)
        for i, (_, variable), update, entry in zip(indices, dense, updates, state.per_coordinate):
            self._write(self._slots[i], self._slot_templates[i], entry)
            self.assign_add(variable, tf.cast(lr * update, variable.dtype))
        self._write(self._shared, self._shared_template, state.shared)

    def update_step(self, gradient, variable, learning_rate):
        """The step of one variable (Keras' per-variable hook; `_backend_update_step` steps all at once)."""
        self._backend_update_step([gradient], [variable], learning_rate)

    def _sparse_update(self, gradient, variable, slots, template, shared, lr, phi, dense):
        """A step for the touched rows only (duplicate indices summed first): their state columns are gathered,
        stepped and scattered back."""
        shape = tuple(variable.shape)
        row_size = math.prod(shape[1:])
        values = tf.cast(gradient.values, tf.float32)
        indices = tf.cast(gradient.indices, tf.int64)
        step = lambda grad, entry: self._rule.step(phi, [grad], RuleState((entry,), shared),
                                                    implementation=self.implementation)
        if dense:  # static shapes for XLA: step every column, keep the untouched ones as they were
            summed = tf.math.unsorted_segment_sum(values, indices, shape[0])
            touched = tf.math.unsorted_segment_sum(tf.ones_like(indices, tf.float32), indices, shape[0]) > 0
            columns = tf.repeat(touched, row_size)
            entry = self._pack(template, slots)
            (update,), new_state = step(tf.reshape(summed, [-1]), entry)
            update = tf.where(columns, update, tf.zeros_like(update))
            new_entry = tf.nest.map_structure(lambda new, old: tf.where(columns[None, :], new, old),
                                              new_state.per_coordinate[0], entry)
            self._write(slots, template, new_entry)
            self.assign_add(variable, tf.cast(lr * tf.reshape(update, shape), variable.dtype))
            return
        rows, segments = tf.unique(indices)
        summed = tf.math.unsorted_segment_sum(values, segments, tf.shape(rows)[0])  # [k, *shape[1:]]
        columns = tf.reshape(rows[:, None] * row_size + tf.range(row_size, dtype=tf.int64)[None, :], [-1])
        entry = tf.nest.pack_sequence_as(template, [tf.cast(tf.gather(slots[p], columns, axis=1), tf.float32)
                                                    for p, _ in _leaves(template)])
        (update,), new_state = step(tf.reshape(summed, [-1]), entry)
        num_columns = tf.shape(columns, out_type=tf.int64)[0]
        for (path, _), new in zip(_leaves(template), tf.nest.flatten(new_state.per_coordinate[0])):
            slot = slots[path]
            state_rows = slot.shape[0]
            positions = tf.stack([tf.repeat(tf.range(state_rows, dtype=tf.int64), num_columns),
                                  tf.tile(columns, [state_rows])], axis=1)
            slot.value.scatter_nd_update(positions, tf.reshape(tf.cast(new, slot.dtype), [-1]))
        row_updates = tf.cast(lr * tf.reshape(update, tf.shape(summed)), variable.dtype)
        self.assign_add(variable, tf.IndexedSlices(row_updates, rows, tf.constant(shape, tf.int64)))

    # ---- saving ----
    def load_own_variables(self, store):
        """`.keras` loading (variables by position), tolerant of a save made before the optimizer was built and of
        files written before rules/ (one flat φ variable where φ's leaves are now).

        Saved unbuilt, loaded built: φ (and the step counter) are restored, the state stays zero.
        Saved built, loaded unbuilt: φ is restored now and the state when `build` creates it.
        """
        store = self._upgrade_store(store)
        count = len(store.keys())
        base = self._num_unbuilt_variables
        partial = count == base and self.built            # saved unbuilt, loaded built
        deferred = count > base and not self.built        # saved built, loaded unbuilt
        if (partial or deferred) and self._base_shapes_match(store):
            for i in range(base):
                self.variables[i].assign(store[str(i)])
            self._phi_restore_pending = False
            if partial:
                warnings.warn(f"optimizer {self.name!r} was saved before it was built: φ restored, the rule's "
                              "state starts from zero", stacklevel=2)
            else:
                self._deferred_slot_values = [np.asarray(store[str(i)]) for i in range(base, count)]
            return
        if count == len(self.variables):  # else Keras warns and skips loading
            self._phi_restore_pending = False
        super().load_own_variables(store)

    def set_weights(self, weights):
        """Keras' `set_weights` (legacy `.h5` loading restores φ with it)."""
        super().set_weights(weights)
        self._phi_restore_pending = False

    def _upgrade_store(self, store):
        """A store written by earlier versions at today's positions: before `skipped_steps` (everything from φ on
        one position earlier: the counter starts at zero) and before rules/ (φ one flat [P] variable where φ's
        leaves are now)."""
        leaves = leaf_paths(self._phi)
        first = self._num_unbuilt_variables - len(leaves)  # φ's position: after iterations (learning_rate), counter
        counter = first - 1
        if str(counter) in store.keys() and not np.issubdtype(np.asarray(store[str(counter)]).dtype, np.integer):
            # φ (always float32) where the int counter is now: written before it existed.
            store = _splice(store, counter, 0, [np.zeros((), np.int64)])
        if not isinstance(self._rule, LSTMUpdateRule) or str(first) not in store.keys():
            return store
        flat = np.asarray(store[str(first)])
        if flat.shape != (self._rule.num_params,) or flat.shape == tuple(leaves[0][1].shape):
            return store
        return _splice(store, first, 1, [np.asarray(leaf) for _, leaf in leaf_paths(self._rule.as_phi_tree(flat))])

    def _base_shapes_match(self, store):
        return all(tuple(np.shape(store[str(i)])) == tuple(self.variables[i].shape)
                   for i in range(self._num_unbuilt_variables))

    def _restore_deferred(self):
        values, self._deferred_slot_values = self._deferred_slot_values, None
        slots = self.variables[self._num_unbuilt_variables:]
        if len(values) != len(slots) or any(tuple(v.shape) != tuple(s.shape) for v, s in zip(values, slots)):
            warnings.warn(f"optimizer {self.name!r}: the saved state does not fit the variables it was built "
                          "with; the state starts from zero (φ was restored)", stacklevel=3)
            return
        for slot, value in zip(slots, values):
            slot.assign(value)

    def get_config(self):
        """The rule's config (one nested `rule_to_config` dict) and the Keras arguments; φ itself travels with the
        saved variables.

        `from_config(get_config())` alone gives a fresh φ (from `phi_seed`) and zero state: copy the variables
        (`.keras` loading does) to get the trained ones.
        """
        config = super().get_config()
        config.update({
            "rule": rule_to_config(self._rule),
            "state_dtype": self.state_dtype,
            "implementation": self.implementation,
            "phi_seed": self.phi_seed,
            "skip_nonfinite": self.skip_nonfinite,
            "matmul_precision": self.matmul_precision,
        })
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Also reads the configs written before rules/ (the LSTM's arguments at the top level, no
        skip_nonfinite); a config saved with implementation="fused" gives "auto", with a warning, where the op is
        missing.

        φ is not part of the config: the optimizer gets a fresh φ (`rule.init_phi(phi_seed)`), with a warning,
        except while Keras loads a file (`keras.models.load_model`), which restores the saved φ right after.
        """
        config = dict(config)
        if config.get("implementation") == "fused" and not ops.fused_available():
            warnings.warn("this optimizer was saved with implementation='fused' but the l2l_tf op library is not "
                          f"available here ({ops.fused_load_error()}); using implementation='auto' (the pure-TF "
                          "step)", stacklevel=2)
            config["implementation"] = "auto"
        outer, _construction.from_config = getattr(_construction, "from_config", False), True
        try:
            optimizer = super().from_config(config, custom_objects=custom_objects)
        finally:
            _construction.from_config = outer
        if _keras_file_loading():
            optimizer._phi_restore_pending = True  # cleared when load_own_variables restores φ; else the step warns
        else:
            warnings.warn(
                f"LearnedOptimizer.from_config: φ is not part of the config, so optimizer {optimizer.name!r} has a "
                f"fresh, untrained φ (rule.init_phi({optimizer.phi_seed!r})) and zero state. φ travels with the "
                "optimizer's variables: restore the model with keras.models.load_model('….keras') or a checkpoint, "
                "or set trained weights with set_phi (see also LearnedOptimizer.from_pretrained / from_file).",
                UserWarning, stacklevel=2)
        return optimizer


# `keras.optimizers.get("LearnedOptimizer")` (and `compile(optimizer="LearnedOptimizer")`), like "adam": Keras looks
# string identifiers up among the custom objects, where the decorator put only "l2l_tf>LearnedOptimizer".
# `keras.saving.get_custom_objects()` is Keras' documented way to add a name; serialization is unaffected (it
# writes the registered name).
keras.saving.get_custom_objects().setdefault("LearnedOptimizer", LearnedOptimizer)


def _all_finite(grads):
    """A scalar bool tensor: every floating gradient (the values of an IndexedSlices) is finite; None is skipped
    and other dtypes are left to the step's own check."""
    checks = []
    for grad in grads:
        if grad is None:
            continue
        values = grad.values if isinstance(grad, tf.IndexedSlices) else tf.convert_to_tensor(grad)
        if values.dtype.is_floating:
            checks.append(tf.reduce_all(tf.math.is_finite(values)))
    return tf.reduce_all(tf.stack(checks)) if checks else tf.constant(True)


def _dense(gradient, variable):
    """A gradient as a dense tensor of the variable's static shape (an IndexedSlices' dense_shape may be a captured,
    unknown value, e.g. inside the tf.cond of `apply`)."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.reshape(tf.convert_to_tensor(gradient), tuple(variable.shape))
    return tf.convert_to_tensor(gradient)


def _keras_file_loading():
    """True when called while Keras loads a saved model (which restores the optimizer's variables after its
    `from_config`): a `load…` function of Keras' saving modules is on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__") in _KERAS_LOADING_MODULES and "load" in frame.f_code.co_name:
            return True
        frame = frame.f_back
    return False


def _splice(store, at, removed, inserted):
    """A `.keras` variable store (positions "0", "1", ...) with its `removed` entries at position `at` replaced by the
    arrays `inserted`; the later entries move along."""
    values = [store[str(i)] for i in range(len(store.keys()))]
    values[at:at + removed] = inserted
    return {str(i): value for i, value in enumerate(values)}


def _leaves(nest):
    """[(leaf path, tensor)] of a state nest (tuples, NamedTuples and dicts): "" for a bare tensor."""
    return [("/".join(str(k) for k in path), leaf) for path, leaf in keras.tree.flatten_with_path(nest)]


def _read(variable):
    value = tf.convert_to_tensor(variable.value)
    return tf.cast(value, tf.float32) if value.dtype.is_floating else value


def _float_tree(rule, phi):
    """A φ argument (tree or, for the LSTM, flat) as float32 numpy leaves; ValueError for non-float values."""
    def as_float32(leaf, path):
        value = np.asarray(leaf.numpy() if isinstance(leaf, keras.Variable) else leaf)
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype == tf.bfloat16.as_numpy_dtype):
            raise ValueError(f"phi must hold floating-point values, got dtype {value.dtype}"
                             + (f" for {path}" if path else ""))
        return value.astype(np.float32)

    if not isinstance(phi, dict):
        phi = as_float32(phi, "")
    return tree_from_paths([(path, as_float32(leaf, path)) for path, leaf in leaf_paths(rule.as_phi_tree(phi))])


class _ConstantArray:
    """Initializer returning a fixed array (φ, a rule's initial state); not serialized (saved as a variable)."""

    def __init__(self, value, dtype="float32"):
        self.value = np.asarray(value, np.float32 if dtype == "float32" else None)

    def __call__(self, shape, dtype=None):
        if tuple(shape) != self.value.shape:
            raise ValueError(f"initializer has shape {self.value.shape}, asked for {tuple(shape)}")
        return tf.cast(tf.constant(self.value), dtype or tf.float32)


def _variable_name(variable):
    return getattr(variable, "path", None) or getattr(variable, "name", "variable")
