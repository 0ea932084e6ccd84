"""`LearnedOptimizer`: the coordinatewise LSTM update rule as a Keras 3 optimizer.

    model.compile(optimizer=LearnedOptimizer.from_pretrained("quadratic"), loss="mse")
    model.fit(x, y)

Every model variable gets its own LSTM state slot, [S, size] (rows h1 | c1 | h2 | c2, one column per coordinate),
and all of them share one flat φ, stored as a non-trainable optimizer variable so that `.keras` files and
`tf.train.Checkpoint`s carry it together with the state. One optimizer step is exactly `LSTMUpdateRule.step`
(update_rule.py) per variable, times `learning_rate`.
"""
import math
import numbers
import os
import pathlib
import warnings

import keras
import numpy as np
import tensorflow as tf

from l2l_tf import ops
from l2l_tf.update_rule import LSTMOptimizerState, LSTMUpdateRule, load_phi

# Where `from_pretrained` looks for <name>.npz (files written by `save_phi`). A module attribute so that tests and
# users with their own collection can point it elsewhere.
PRETRAINED_DIR = pathlib.Path(__file__).resolve().parent / "pretrained"

STATE_DTYPES = ("float32", "bfloat16", "float16")
_RULE_FIELDS = ("hidden1", "hidden2", "preprocess", "preprocess_param", "output_scale")


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


def _rule_mismatch(file_rule, rule):
    """Human-readable list of the rule fields where `rule` differs from the file's."""
    diffs = []
    for field in _RULE_FIELDS:
        a, b = getattr(file_rule, field), getattr(rule, field)
        same = math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) if isinstance(a, float) else a == b
        if not same:
            diffs.append(f"{field}={a!r} in the file vs {b!r} given")
    return diffs


@keras.saving.register_keras_serializable(package="l2l_tf")
class LearnedOptimizer(keras.optimizers.Optimizer):
    """Optimizer that applies a learned coordinatewise LSTM update (Andrychowicz et al., 2016).

    For every model variable θ with gradient ∇ and LSTM state h:

        g, h ← LSTM_φ(preprocess(∇), h)            (one small 2-layer LSTM shared by all coordinates)
        θ ← θ + learning_rate · output_scale · g

    i.e. `LSTMUpdateRule.step` times `learning_rate`. The LSTM was meta-trained with `output_scale`, so keep that
    at the value φ was trained with and use `learning_rate` (1.0 = the rule as trained; a float, a
    `keras.optimizers.schedules.LearningRateSchedule` or a callable) to shrink, grow or schedule the steps.
    Note the base class's `weight_decay` is also multiplied by `learning_rate` (θ ← θ − lr·wd·θ).

    State: one slot per model variable, shape [S, size] with S = 2·(hidden1 + hidden2), zero at the start.
    The LSTM math always runs in float32: gradients of float16/bfloat16/float64 variables are cast to float32 and
    the update is cast back to the variable's dtype; state is stored in `state_dtype`.

    Sparse gradients (`tf.IndexedSlices`, e.g. from `Embedding`): duplicate indices are summed first (the same
    gradient the dense path would see for those rows); then only the touched rows take an LSTM step: their
    coordinates are updated and their state columns advance, while untouched rows keep both their values and
    their state, as if their step had been skipped. (Inside XLA compilation the same result is computed with a
    dense masked step, since XLA needs static shapes.)

    Args:
        phi: the LSTM weights: None (a fresh `init_phi(phi_seed)`, untrained), a float vector of shape [P]
            (numpy array or tensor), or the path of an .npz written by `save_phi`, whose stored rule
            (hidden1, hidden2, preprocess, preprocess_param, output_scale) must equal the arguments here;
            `LearnedOptimizer.from_file(path)` / `from_pretrained(name)` take the file's rule instead.
        hidden1: units of the first LSTM layer.
        hidden2: units of the second LSTM layer.
        preprocess: gradient preprocessing, "paper" (LogAndSign, p = 10), "clamped" (release, k = 5) or "none".
        preprocess_param: p for "paper" / k for "clamped"; None for the default.
        output_scale: the LSTM output is multiplied by this (the value φ was trained with).
        learning_rate: multiplies the update on top of `output_scale`; defaults to 1.0 (the rule as trained).
        state_dtype: storage dtype of the LSTM state slots: "float32" (default), "bfloat16" or "float16".
            The state is computed in float32 and rounded when stored.
        implementation: "auto" (the fused op when built, the pure-TF reference inside XLA compilation or when
            the op is missing), "fused" (error if not built, or under `jit_compile=True`) or "reference".
        phi_seed: seed of the fresh φ when `phi` is None (also used by `from_config`, before saved
            variables are loaded).
        name: the optimizer's name.
        **kwargs: the usual Keras optimizer arguments: weight_decay, clipnorm, clipvalue, global_clipnorm,
            use_ema, ema_momentum, ema_overwrite_frequency, loss_scale_factor, gradient_accumulation_steps.

    Raises:
        FileNotFoundError: `phi` names a missing file.
        ValueError: a bad φ (unreadable or malformed file, wrong shape for the configuration, non-finite values,
            a file whose rule differs from the arguments), a bad rule argument or a bad `state_dtype`.
        TypeError: `phi` of an unsupported type; (at build/update time) a non-floating variable or gradient.
        RuntimeError: implementation="fused" without the compiled op.
    """

    def __init__(
        self,
        phi=None,
        hidden1=20,
        hidden2=20,
        preprocess="paper",
        preprocess_param=None,
        output_scale=0.1,
        learning_rate=1.0,
        state_dtype="float32",
        implementation="auto",
        phi_seed=0,
        name="learned_optimizer",
        **kwargs,
    ):
        # Validate everything before any variable exists.
        rule = LSTMUpdateRule(hidden1=hidden1, hidden2=hidden2, preprocess=preprocess,
                              preprocess_param=preprocess_param, output_scale=output_scale,
                              implementation=implementation)
        state_dtype = _standardize_state_dtype(state_dtype)
        phi_value, phi_metadata = self._resolve_phi(phi, rule, phi_seed)
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)  # Keras wants a Python float (1, np.float32(0.5) are fine too)

        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self._rule = rule
        self.state_dtype = state_dtype
        self.phi_seed = phi_seed
        self.phi_metadata = phi_metadata
        self._states = []
        self._deferred_slot_values = None
        self._phi = self.add_variable(shape=(rule.num_params,), initializer=_ConstantArray(phi_value),
                                      dtype="float32", name="phi")
        # iteration (+ learning_rate) + phi: what exists before `build`; `.keras` stores variables by position.
        self._num_unbuilt_variables = len(self.variables)

    # ---- construction helpers ----
    @staticmethod
    def _resolve_phi(phi, rule, phi_seed):
        """(float32 numpy [P], metadata dict) from the `phi` argument."""
        if phi is None:
            return np.asarray(rule.init_phi(phi_seed)), {}
        if isinstance(phi, (str, os.PathLike)):
            file_rule, value, metadata = load_phi(phi)
            diffs = _rule_mismatch(file_rule, rule)
            if diffs:
                raise ValueError(
                    f"φ file {os.fspath(phi)!r} does not match this optimizer's configuration: {'; '.join(diffs)}. "
                    "Pass the file's values, or use LearnedOptimizer.from_file(path) to take them from the file "
                    "(rescale steps with learning_rate, not output_scale).")
            return np.asarray(value, np.float32), dict(metadata)
        if isinstance(phi, keras.Variable):
            phi = phi.numpy()
        if not (isinstance(phi, (np.ndarray, list, tuple)) or tf.is_tensor(phi)):
            raise TypeError(f"phi must be None, a path to a save_phi .npz, or a float vector of shape "
                            f"({rule.num_params},); got {type(phi).__name__}")
        value = np.asarray(phi)
        if not (np.issubdtype(value.dtype, np.floating) or value.dtype == tf.bfloat16.as_numpy_dtype):
            raise ValueError(f"phi must hold floating-point values, got dtype {value.dtype}")
        value = value.astype(np.float32)
        rule.check_phi(value)
        if not np.all(np.isfinite(value)):
            raise ValueError("phi holds non-finite values (NaN or inf)")
        return value, {}

    @classmethod
    def from_file(cls, path, **kwargs):
        """An optimizer with the φ and the rule configuration stored in `path` (an .npz written by `save_phi`).

        `kwargs` go to the constructor (learning_rate, state_dtype, implementation, name, clipnorm, ...). Rule
        arguments (hidden1, hidden2, preprocess, preprocess_param, output_scale) may be given but must equal the
        file's: φ is only meaningful with the rule it was trained with.
        """
        file_rule, _, _ = load_phi(path)
        config = {field: getattr(file_rule, field) for field in _RULE_FIELDS}
        config.update(kwargs)
        return cls(phi=path, **config)

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
        """The `LSTMUpdateRule` this optimizer applies (hyperparameters; φ is `self.phi`)."""
        return self._rule

    @property
    def phi(self):
        """The float32 [P] φ variable (assign to it to swap in other weights)."""
        return self._phi

    def state_slot(self, variable):
        """The [S, size] LSTM state variable of a model variable (after `build`)."""
        if not self.built:
            raise ValueError("the optimizer is not built yet: call build(variables) or train first")
        return self._states[self._get_variable_index(variable)]

    def reset_state(self):
        """Zeroes every LSTM state slot (e.g. before optimizing a new problem with the same optimizer)."""
        for slot in self._states:
            if slot is not None:
                slot.assign(tf.zeros(slot.shape, slot.dtype))

    # ---- Keras optimizer API ----
    def build(self, var_list):
        """Creates one LSTM state slot, [S, size] in `state_dtype`, per model variable (φ already exists)."""
        if self.built:
            return
        for variable in var_list:
            dtype = tf.as_dtype(keras.backend.standardize_dtype(variable.dtype))
            if not dtype.is_floating:
                raise TypeError(
                    f"LearnedOptimizer only updates floating-point variables; {_variable_name(variable)!r} has "
                    f"dtype {dtype.name}")
        super().build(var_list)
        states = []
        for variable in var_list:
            if self._overwrite_variable_with_gradient(variable):
                states.append(None)
                continue
            size = math.prod(variable.shape)
            states.append(self.add_variable(
                shape=(self._rule.state_rows, size), initializer="zeros", dtype=self.state_dtype,
                name=f"{_variable_name(variable).replace('/', '_').replace(':', '_')}_lstm_state"))
        self._states = states
        if self._deferred_slot_values is not None:
            self._restore_deferred()

    def update_step(self, gradient, variable, learning_rate):
        """One LSTM step for one variable: θ ← θ + learning_rate · rule.step(φ, ∇, h); h ← new state."""
        grad_dtype = tf.as_dtype(gradient.dtype)
        if not grad_dtype.is_floating:
            raise TypeError(f"LearnedOptimizer needs floating-point gradients; got {grad_dtype.name} for "
                            f"{_variable_name(variable)!r}")
        slot = self._states[self._get_variable_index(variable)]
        lr = tf.cast(learning_rate, tf.float32)
        phi = tf.convert_to_tensor(self._phi.value)
        # The ops layer picks the step's implementation: under XLA (jit_compile) "auto" runs the pure-TF step.
        rule = self._rule
        if isinstance(gradient, tf.IndexedSlices):
            self._sparse_update(gradient, variable, slot, lr, phi, rule, dense=ops.fused.inside_xla_compilation())
            return
        state = tf.cast(slot.value, tf.float32)
        grad = tf.cast(gradient, tf.float32)
        (update,), new_state = rule.step(phi, [grad], LSTMOptimizerState((state,)))
        self.assign(slot, tf.cast(new_state.lstm[0], slot.dtype))
        self.assign_add(variable, tf.cast(lr * update, variable.dtype))

    def _sparse_update(self, gradient, variable, slot, lr, phi, rule, dense):
        """An LSTM step for the touched rows only (duplicate indices summed first)."""
        shape = tuple(variable.shape)
        row_size = math.prod(shape[1:])
        values = tf.cast(gradient.values, tf.float32)
        indices = tf.cast(gradient.indices, tf.int64)
        state_rows = self._rule.state_rows
        if dense:  # static shapes for XLA: step every column, keep the untouched ones as they were
            summed = tf.math.unsorted_segment_sum(values, indices, shape[0])
            touched = tf.math.unsorted_segment_sum(tf.ones_like(indices, tf.float32), indices, shape[0]) > 0
            columns = tf.repeat(touched, row_size)
            state = tf.cast(slot.value, tf.float32)
            (update,), new_state = rule.step(phi, [tf.reshape(summed, [-1])], LSTMOptimizerState((state,)))
            update = tf.where(columns, update, tf.zeros_like(update))
            new_state = tf.where(columns[None, :], new_state.lstm[0], state)
            self.assign(slot, tf.cast(new_state, slot.dtype))
            self.assign_add(variable, tf.cast(lr * tf.reshape(update, shape), variable.dtype))
            return
        rows, segments = tf.unique(indices)
        summed = tf.math.unsorted_segment_sum(values, segments, tf.shape(rows)[0])  # [k, *shape[1:]]
        columns = tf.reshape(rows[:, None] * row_size + tf.range(row_size, dtype=tf.int64)[None, :], [-1])
        state = tf.cast(tf.gather(slot.value, columns, axis=1), tf.float32)  # [S, k·row_size]
        (update,), new_state = rule.step(phi, [tf.reshape(summed, [-1])], LSTMOptimizerState((state,)))
        num_columns = tf.shape(columns, out_type=tf.int64)[0]
        positions = tf.stack([tf.repeat(tf.range(state_rows, dtype=tf.int64), num_columns),
                              tf.tile(columns, [state_rows])], axis=1)
        slot.value.scatter_nd_update(positions, tf.reshape(tf.cast(new_state.lstm[0], slot.dtype), [-1]))
        row_updates = tf.cast(lr * tf.reshape(update, tf.shape(summed)), variable.dtype)
        self.assign_add(variable, tf.IndexedSlices(row_updates, rows, tf.constant(shape, tf.int64)))

    # ---- saving ----
    def load_own_variables(self, store):
        """`.keras` loading (variables by position), tolerant of a save made before the optimizer was built.

        Saved unbuilt, loaded built: φ (and the step counter) are restored, the LSTM state stays zero.
        Saved built, loaded unbuilt: φ is restored now and the state slots when `build` creates them.
        """
        count = len(store.keys())
        base = self._num_unbuilt_variables
        partial = count == base and self.built            # saved unbuilt, loaded built
        deferred = count > base and not self.built        # saved built, loaded unbuilt
        if (partial or deferred) and self._base_shapes_match(store):
            for i in range(base):
                self.variables[i].assign(store[str(i)])
            if partial:
                warnings.warn(f"optimizer {self.name!r} was saved before it was built: φ restored, the LSTM "
                              "state starts from zero", stacklevel=2)
            else:
                self._deferred_slot_values = [np.asarray(store[str(i)]) for i in range(base, count)]
            return
        super().load_own_variables(store)

    def _base_shapes_match(self, store):
        return all(tuple(np.shape(store[str(i)])) == tuple(self.variables[i].shape)
                   for i in range(self._num_unbuilt_variables))

    def _restore_deferred(self):
        values, self._deferred_slot_values = self._deferred_slot_values, None
        slots = self.variables[self._num_unbuilt_variables:]
        if len(values) != len(slots) or any(tuple(v.shape) != tuple(s.shape) for v, s in zip(values, slots)):
            warnings.warn(f"optimizer {self.name!r}: the saved LSTM state does not fit the variables it was built "
                          "with; the state starts from zero (φ was restored)", stacklevel=3)
            return
        for slot, value in zip(slots, values):
            slot.assign(value)

    def get_config(self):
        """The rule's hyperparameters and the Keras arguments; φ itself travels with the saved variables.

        `from_config(get_config())` alone gives a fresh φ (from `phi_seed`) and zero state: copy the variables
        (`.keras` loading does) to get the trained ones.
        """
        config = super().get_config()
        config.update({
            "hidden1": self._rule.hidden1,
            "hidden2": self._rule.hidden2,
            "preprocess": self._rule.preprocess,
            "preprocess_param": self._rule.preprocess_param,
            "output_scale": self._rule.output_scale,
            "state_dtype": self.state_dtype,
            "implementation": self._rule.implementation,
            "phi_seed": self.phi_seed,
        })
        return config


class _ConstantArray:
    """Initializer returning a fixed array (φ); not serialized (φ is saved as a variable)."""

    def __init__(self, value):
        self.value = np.asarray(value, np.float32)

    def __call__(self, shape, dtype=None):
        if tuple(shape) != self.value.shape:
            raise ValueError(f"phi initializer has shape {self.value.shape}, asked for {tuple(shape)}")
        return tf.constant(self.value, dtype or tf.float32)


def _variable_name(variable):
    return getattr(variable, "path", None) or getattr(variable, "name", "variable")
