"""Any Keras model, data set and loss as a problem family (through Keras 3 `stateless_call`)."""
import json
import zlib

import numpy as np
import tensorflow as tf

from l2l_tf.problems.base import ProblemFamily, ProblemInstance
from l2l_tf.rules import param_specs


class KerasModelFamily(ProblemFamily):
    """Turns a Keras model, a data set and a loss into a problem family (a new initialisation per seed).

    The model is evaluated functionally with Keras 3 `stateless_call`: θ are its trainable variables' values and
    `extra` its non-trainable ones (batch-norm moving statistics), carried from step to step in training mode.
    Each step draws a minibatch of `batch_size` examples with replacement (as the authors' release does) from
    the stateless RNG seeded by (problem seed, step), so every optimizer sees the same minibatches.

    Args:
        model_fn: `model_fn(seed) -> keras.Model`, a built model whose initial weights come from `seed`. The model
            from `model_fn(0)` serves as the template for evaluation; without `initial_values_fn`, `model_fn` is
            also called once per sampled problem.
        data: a `tf.data.Dataset` of (x, y) pairs (unbatched, or batched: it is unbatched), or a tuple (x, y) of
            arrays. It is read into memory once (at most `max_examples` examples).
        loss_fn: a Keras loss (object, function or name such as "sparse_categorical_crossentropy") of (y, y_pred).
        batch_size: minibatch size (paper: 128).
        max_examples: cap on the examples read from `data` (None reads all).
        examples_per_problem: each problem trains on its own random subset of this many examples, drawn by its
            seed (None: every problem uses all of them). Lets problems drawn from data splits of different sizes
            come from one distribution (the same data-set size), as learning to learn assumes.
        initial_values_fn: optional `initial_values_fn(seed) -> (trainable values, non-trainable values or None)`,
            the initial values (arrays or tensors, in the order of the model's variables) of the model that
            `model_fn(seed)` builds, without building it: problems are then sampled without a Keras model each.
            None for the non-trainable values takes the template's (those of `model_fn(0)`). Shapes and dtypes
            must be the template's; `initial_values_fn(0)` must give exactly the template's values (checked here:
            `describe()` fingerprints the family by them).
    """

    def __init__(self, model_fn, data, loss_fn, batch_size=128, max_examples=None, examples_per_problem=None,
                 initial_values_fn=None):
        import keras

        self.model_fn = model_fn
        self.model = model_fn(0)
        if not self.model.built:
            raise ValueError("model_fn must return a built model (call it on an input or give an Input layer)")
        self.initial_values_fn = initial_values_fn
        if initial_values_fn is not None:
            params, extra = self._initial_values(0)
            for variable, value in zip(self.model.trainable_variables + self.model.non_trainable_variables,
                                       params + extra):
                if not np.array_equal(variable.numpy(), value.numpy()):
                    raise ValueError(f"initial_values_fn(0) gives other values for {variable.path} than the model "
                                     "of model_fn(0): the two must draw the same initial values from a seed")
        self.loss_fn = keras.losses.get(loss_fn) if isinstance(loss_fn, str) else loss_fn
        self.batch_size = int(batch_size)
        self.x, self.y = _materialize(data, max_examples)
        self.num_examples = int(self.x.shape[0])
        if self.num_examples < 1:
            raise ValueError("the data set is empty")
        if examples_per_problem is not None and not 1 <= int(examples_per_problem) <= self.num_examples:
            raise ValueError(f"examples_per_problem must be between 1 and the {self.num_examples} examples of the "
                             f"data set, got {examples_per_problem}")
        self.examples_per_problem = None if examples_per_problem is None else int(examples_per_problem)

    def sample(self, seed):
        if self.initial_values_fn is not None:
            params, extra = self._initial_values(seed)
        else:
            model = self.model_fn(seed)
            params = tuple(tf.identity(tf.convert_to_tensor(v.value)) for v in model.trainable_variables)
            extra = tuple(tf.identity(tf.convert_to_tensor(v.value)) for v in model.non_trainable_variables)
            _check_same_structure(self.model, model)
        minibatch_seed = tf.constant(np.random.default_rng(seed).integers(0, 2**31 - 1), tf.int32)
        x, y = self.x, self.y
        if self.examples_per_problem is not None and self.examples_per_problem < self.num_examples:
            subset = np.sort(np.random.default_rng([seed, 1]).choice(self.num_examples, self.examples_per_problem,
                                                                     replace=False))
            x, y = tf.gather(x, subset), tf.gather(y, subset)
        return ProblemInstance(params, extra, (x, y, minibatch_seed))

    def _initial_values(self, seed):
        """(params, extra) of `initial_values_fn(seed)` as tensors, checked against the template's variables."""
        result = self.initial_values_fn(seed)
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ValueError(f"initial_values_fn(seed) must return (trainable values, non-trainable values or None), "
                             f"got {type(result).__name__}")
        trainable, non_trainable = result
        if non_trainable is None:
            non_trainable = [v.value for v in self.model.non_trainable_variables]
        groups = []
        for kind, variables, values in (("trainable", self.model.trainable_variables, trainable),
                                        ("non-trainable", self.model.non_trainable_variables, non_trainable)):
            values = list(values)
            if len(values) != len(variables):
                raise ValueError(f"initial_values_fn(seed) gave {len(values)} {kind} values, the model has "
                                 f"{len(variables)} {kind} variables")
            tensors = []
            for variable, value in zip(variables, values):
                tensor = tf.identity(tf.convert_to_tensor(value))
                expected = (tuple(variable.shape), tf.as_dtype(variable.dtype))
                if (tuple(tensor.shape), tensor.dtype) != expected:
                    raise ValueError(f"initial_values_fn(seed): the {kind} value for {variable.path} has shape "
                                     f"{tuple(tensor.shape)} and dtype {tensor.dtype.name}; the model's variable "
                                     f"has shape {expected[0]} and dtype {expected[1].name}")
                tensors.append(tensor)
            groups.append(tuple(tensors))
        return groups[0], groups[1]

    def param_specs(self):
        return param_specs(self.model.trainable_variables)

    def describe(self):
        """The model (its config, seed 0's weights by checksum), the loss, the data (size and checksum), batch size
        and examples per problem. Layer and variable names are left out: Keras numbers unnamed layers by creation
        order, which differs between processes that build the same model."""
        loss = getattr(self.loss_fn, "get_config", None)
        return {"class": type(self).__name__,
                "param_shapes": [[list(spec.shape), spec.dtype] for spec in self.param_specs()],
                "model": _without_names(_jsonable(self.model.get_config())),
                "initial_weights_crc32": _crc32(*[v.numpy() for v in self.model.variables]),
                "loss": _jsonable(loss()) if loss else getattr(self.loss_fn, "__name__", repr(self.loss_fn)),
                "num_examples": self.num_examples, "data_crc32": _crc32(self.x.numpy(), self.y.numpy()),
                "batch_size": self.batch_size, "examples_per_problem": self.examples_per_problem}

    def minibatch(self, data, step):
        x, y, minibatch_seed = data
        index = tf.random.stateless_uniform([self.batch_size], seed=tf.stack([minibatch_seed, tf.cast(step, tf.int32)]),
                                            maxval=tf.shape(x)[0], dtype=tf.int32)
        return tf.gather(x, index), tf.gather(y, index)

    def loss(self, params, extra, data, step):
        x, y = self.minibatch(data, step)
        y_pred, new_extra, losses = self.model.stateless_call(
            list(params), list(extra), x, training=True, return_losses=True)
        loss = tf.reduce_mean(self.loss_fn(y, y_pred))
        if losses:
            loss = loss + tf.add_n(losses)
        return tf.cast(loss, tf.float32), tuple(new_extra)


def _crc32(*arrays):
    """A checksum of arrays' values and shapes (cheap enough for a data set held in memory)."""
    value = 0
    for array in arrays:
        array = np.ascontiguousarray(array)
        value = zlib.crc32(repr((array.shape, str(array.dtype))).encode(), value)
        value = zlib.crc32(array.tobytes(), value)
    return value


def _jsonable(value):
    """`value` with whatever JSON can't hold (dtype objects, tuples) as JSON-equivalent values."""
    return json.loads(json.dumps(value, default=str))


def _without_names(config):
    if isinstance(config, dict):
        return {k: _without_names(v) for k, v in config.items() if k != "name"}
    if isinstance(config, list):
        return [_without_names(v) for v in config]
    return config


def _materialize(data, max_examples):
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise ValueError(f"the data set must yield (x, y) pairs, got element spec {spec}")
        if spec[0].shape.rank is not None and spec[0].shape.rank > 0 and spec[0].shape[0] is None:
            data = data.unbatch()
        if max_examples is not None:
            data = data.take(max_examples)
        xs, ys = [], []
        for x, y in data.batch(4096):
            xs.append(x)
            ys.append(y)
        if not xs:
            raise ValueError("the data set is empty")
        return tf.concat(xs, 0), tf.concat(ys, 0)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (tf.convert_to_tensor(a) for a in data)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y hold different numbers of examples: {x.shape[0]} vs {y.shape[0]}")
        if max_examples is not None:
            x, y = x[:max_examples], y[:max_examples]
        return x, y
    raise TypeError(f"data must be a tf.data.Dataset of (x, y) or an (x, y) tuple, got {type(data).__name__}")


def _check_same_structure(template, model):
    shapes = lambda m: [tuple(v.shape) for v in m.variables]
    if shapes(template) != shapes(model):
        raise ValueError("model_fn(seed) must return models of the same architecture for every seed")
