"""The CIFAR optimizee of the paper (Fig. 7): a small convnet on 32×32 colour images, cross-entropy.

    families = cifar_families(load_cifar10(...), num_classes=10, examples_per_problem=1000)
    families["train"], families["validation"], families["test"]      # KerasModelFamily each
    rule = two_lstm_rule(output_scale=0.1)                             # one LSTM for conv kernels, one for the rest

The network: three 5×5 convolutions with 16 channels (SAME padding), each followed by batch normalisation, ReLU and
2×2 max-pooling; a fully connected layer of 32 units with batch normalisation and ReLU; `num_classes` logits.
Convolutions and the hidden dense layer have no bias (batch normalisation's offset plays its part). Batch-norm
moving statistics are the family's carried "extra" state (training mode at every step). Weights are drawn from
`numpy.random.default_rng(seed)` (Glorot-uniform kernels, zero offsets, unit scales), so a seed is a network.
"""
import math

import numpy as np

from l2l_tf.problems.keras_model import KerasModelFamily
from l2l_tf.rules import LSTMUpdateRule, Partitioned

INPUT_SHAPE = (32, 32, 3)


def build_convnet(num_classes=10, seed=0, channels=16, kernel_size=5, conv_layers=3, dense_units=32):
    """A built Keras convnet of the paper's CIFAR experiments with weights drawn from `seed`."""
    import keras
    from keras import layers

    stack = [keras.Input(INPUT_SHAPE)]
    for i in range(conv_layers):
        stack += [layers.Conv2D(channels, kernel_size, padding="same", use_bias=False, name=f"conv{i + 1}"),
                  layers.BatchNormalization(name=f"conv{i + 1}_bn"), layers.ReLU(name=f"conv{i + 1}_relu"),
                  layers.MaxPooling2D(2, name=f"conv{i + 1}_pool")]
    stack += [layers.Flatten(name="flatten"), layers.Dense(dense_units, use_bias=False, name="fc"),
              layers.BatchNormalization(name="fc_bn"), layers.ReLU(name="fc_relu"),
              layers.Dense(num_classes, name="logits")]
    model = keras.Sequential(stack, name="cifar_convnet")
    rng = np.random.default_rng(seed)
    for variable in model.trainable_variables:
        shape = tuple(variable.shape)
        if variable.path.endswith("kernel"):
            fan_in, fan_out = math.prod(shape[:-1]), shape[-1] * (math.prod(shape[:-2]) if len(shape) > 2 else 1)
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            variable.assign(rng.uniform(-limit, limit, shape).astype(np.float32))
    return model


def convnet_model_fn(num_classes=10):
    """`model_fn(seed) -> keras.Model` for `KerasModelFamily`."""
    def model_fn(seed):
        return build_convnet(num_classes, seed=seed)

    return model_fn


def cross_entropy():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def cifar_families(splits, num_classes=10, batch_size=128, examples_per_problem=None):
    """{split: KerasModelFamily} of the convnet over the data splits of `datasets.load_cifar10` (x [N, 32, 32, 3]
    float32, y [N] int labels in 0..num_classes-1). `examples_per_problem`: each problem trains on its own seeded
    subset of that many images of its split (None: the whole split)."""
    model_fn = convnet_model_fn(num_classes)
    return {split: KerasModelFamily(model_fn, (x, y), cross_entropy(), batch_size=batch_size,
                                    examples_per_problem=examples_per_problem)
            for split, (x, y) in splits.items()}


def two_lstm_rule(output_scale=0.1, hidden1=20, hidden2=20, preprocess="paper"):
    """The paper's CIFAR optimizer: one coordinatewise LSTM for the convolution kernels (rank 4), one for every
    other tensor (batch-norm scales and offsets, the dense layers), each with its own φ."""
    lstm = LSTMUpdateRule(hidden1, hidden2, preprocess, output_scale=output_scale)
    return Partitioned({"conv": lstm, "other": lstm}, assign=[("conv", "rank>=4")], default="other")
