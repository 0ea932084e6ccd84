import keras
import numpy as np
import pytest
import tensorflow as tf

from l2l_tf.problems import KerasModelFamily, QuadraticFamily, seeds_for


def test_quadratic_sampling_and_loss_by_hand():
    family = QuadraticFamily(batch_size=3, num_dims=4)
    a, b = family.sample(5), family.sample(5)
    np.testing.assert_array_equal(a.data[0].numpy(), b.data[0].numpy())
    assert not np.array_equal(a.data[0].numpy(), family.sample(6).data[0].numpy())
    theta = a.params[0].numpy()
    assert theta.shape == (3, 4) and 0.001 < theta.std() < 0.05          # θ_0 ~ N(0, 0.01²)
    w, y = (t.numpy() for t in a.data)
    expected = np.mean([np.sum((w[i] @ theta[i] - y[i]) ** 2) for i in range(3)])
    np.testing.assert_allclose(float(family.loss(a.params, (), a.data, 0)[0]), expected, rtol=1e-5)
    uniform = QuadraticFamily(distribution="uniform").sample(0).data[0].numpy()
    assert uniform.min() >= 0 and uniform.max() < 1
    with pytest.raises(ValueError, match="distribution"):
        QuadraticFamily(distribution="cauchy")


def test_seed_splits_are_disjoint():
    splits = [set(seeds_for(s, 1000)) for s in ("train", "validation", "test")]
    assert not (splits[0] & splits[1]) and not (splits[1] & splits[2]) and not (splits[0] & splits[2])


def mlp(seed, batch_norm=False):
    init = keras.initializers.RandomNormal(stddev=0.5, seed=seed)
    layers = [keras.Input((6,)), keras.layers.Dense(5, activation="sigmoid", kernel_initializer=init)]
    if batch_norm:
        layers.append(keras.layers.BatchNormalization(momentum=0.5))
    layers.append(keras.layers.Dense(3, kernel_initializer=init, kernel_regularizer=keras.regularizers.L2(0.01)))
    return keras.Sequential(layers)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_keras_adapter_matches_the_model_evaluated_the_ordinary_way(batch_norm):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 3, 40)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    family = KerasModelFamily(lambda s: mlp(s, batch_norm), tf.data.Dataset.from_tensor_slices((x, y)), loss_fn,
                              batch_size=8)
    problem = family.sample(11)
    reference = mlp(11, batch_norm)  # same seed → same initial weights
    for v, p in zip(reference.trainable_variables, problem.params):
        np.testing.assert_array_equal(v.numpy(), p.numpy())
    extra = problem.extra
    for step in range(3):
        xb, yb = family.minibatch(problem.data, tf.constant(step))
        loss, extra = family.loss(problem.params, extra, problem.data, tf.constant(step))
        expected = loss_fn(yb, reference(xb, training=True)) + tf.add_n(reference.losses)
        np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
        for v, e in zip(reference.non_trainable_variables, extra):  # batch-norm statistics carried along
            np.testing.assert_allclose(v.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)
    if batch_norm:
        assert not np.allclose(extra[0].numpy(), problem.extra[0].numpy())
    # minibatches: reproducible per (problem, step), different across steps
    a, _ = family.minibatch(problem.data, tf.constant(1))
    b, _ = family.minibatch(problem.data, tf.constant(1))
    c, _ = family.minibatch(problem.data, tf.constant(2))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


def test_keras_adapter_inputs():
    x, y = np.zeros((10, 6), np.float32), np.zeros(10, np.int64)
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    family = KerasModelFamily(mlp, batched, "sparse_categorical_crossentropy", max_examples=7)
    assert family.num_examples == 7
    assert KerasModelFamily(mlp, (x, y), "mse").num_examples == 10
    with pytest.raises(ValueError, match="different numbers"):
        KerasModelFamily(mlp, (x, y[:3]), "mse")
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        KerasModelFamily(mlp, x, "mse")
    with pytest.raises(ValueError, match="empty"):
        KerasModelFamily(mlp, tf.data.Dataset.from_tensor_slices((x[:0], y[:0])), "mse")


def test_examples_per_problem_draws_a_seeded_subset_per_problem():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)  # row i holds (2i, 2i + 1): rows are identifiable
    y = np.arange(20, dtype=np.int64)
    family = KerasModelFamily(mlp, (x, y), "mse", examples_per_problem=6)
    subsets = {seed: family.sample(seed).data[1].numpy() for seed in (0, 1)}
    for seed, labels in subsets.items():
        assert len(labels) == 6 and len(set(labels)) == 6                      # without replacement
        np.testing.assert_array_equal(family.sample(seed).data[0].numpy(), x[labels])  # images match labels
        np.testing.assert_array_equal(family.sample(seed).data[1].numpy(), labels)     # seeded
    assert not np.array_equal(subsets[0], subsets[1])
    # minibatches only come from the problem's subset
    batch_x, _ = family.minibatch(family.sample(0).data, tf.constant(3))
    assert set(batch_x.numpy()[:, 0] // 2) <= set(subsets[0])
    # the whole data set when the subset is as large as it
    whole = KerasModelFamily(mlp, (x, y), "mse", examples_per_problem=20)
    np.testing.assert_array_equal(whole.sample(0).data[1].numpy(), y)
    with pytest.raises(ValueError, match="examples_per_problem"):
        KerasModelFamily(mlp, (x, y), "mse", examples_per_problem=21)


def test_cifar_convnet_architecture_seeding_and_batch_norm_state():
    """The paper's convnet: three 5×5×16 SAME convs with BN/ReLU/2×2 pooling, a 32-unit BN/ReLU layer, logits;
    a seed fixes the weights; batch-norm moving statistics are carried between steps as the family's extra."""
    from l2l_tf.problems.cifar import build_convnet, cifar_families

    model = build_convnet(num_classes=5, seed=3)
    shapes = {v.path.split("/", 1)[1]: tuple(v.shape) for v in model.trainable_variables}
    assert shapes["conv1/kernel"] == (5, 5, 3, 16) and shapes["conv2/kernel"] == (5, 5, 16, 16)
    assert shapes["conv3/kernel"] == (5, 5, 16, 16) and shapes["fc/kernel"] == (4 * 4 * 16, 32)
    assert shapes["logits/kernel"] == (32, 5) and shapes["fc_bn/gamma"] == (32,)
    assert model.output_shape == (None, 5)
    again, other = build_convnet(num_classes=5, seed=3), build_convnet(num_classes=5, seed=4)
    for a, b, c in zip(model.get_weights(), again.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(model.get_weights()[0], other.get_weights()[0])
    limit = np.sqrt(6.0 / (5 * 5 * 3 + 5 * 5 * 16))
    kernel = model.get_weights()[0]
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit  # Glorot-uniform range

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(40, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 5, 40).astype(np.int32)
    family = cifar_families({"train": (x, y)}, num_classes=5, batch_size=8)["train"]
    problem = family.sample(1)
    assert len(problem.extra) == 8  # moving mean and variance of the four batch-norm layers
    loss, extra = family.loss(problem.params, problem.extra, problem.data, tf.constant(0))
    assert np.isfinite(float(loss))
    moved = [not np.allclose(a.numpy(), b.numpy()) for a, b in zip(problem.extra, extra)]
    assert all(moved), "training-mode steps update every moving statistic"


def test_initial_values_fn_replaces_model_fn_when_sampling_and_is_checked():
    """initial_values_fn(seed) gives θ_0 (and optionally the non-trainable values) without a model per problem; a
    result whose count, shape or dtype differs from the template's variables is refused, naming the variable."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 3, 20)
    model_fn = lambda seed: mlp(seed, batch_norm=True)
    trainable = lambda seed: [v.numpy() for v in model_fn(seed).trainable_variables]
    family = KerasModelFamily(model_fn, (x, y), "mse", initial_values_fn=lambda seed: (trainable(seed), None))
    built = KerasModelFamily(model_fn, (x, y), "mse")
    assert family.describe() == built.describe()
    problem, reference = family.sample(4), built.sample(4)
    assert len(problem.extra) == 2  # None: the template's batch-norm moving statistics
    for a, b in zip(tf.nest.flatten(problem), tf.nest.flatten(reference)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    def family_with(values_fn):
        return KerasModelFamily(model_fn, (x, y), "mse", initial_values_fn=values_fn)

    kernel = r"trainable value for \S+/dense_\d+/kernel has"  # the variable's path (Keras numbers the layers)
    with pytest.raises(ValueError, match=kernel + r" shape \(6, 4\) and dtype float32; .* shape \(6, 5\)"):
        family_with(lambda seed: ([np.zeros((6, 4), np.float32)] + trainable(seed)[1:], None))
    with pytest.raises(ValueError, match=kernel + " shape \\(6, 5\\) and dtype float64"):
        family_with(lambda seed: ([np.zeros((6, 5))] + trainable(seed)[1:], None))
    with pytest.raises(ValueError, match="gave 1 non-trainable values, the model has 2"):
        family_with(lambda seed: (trainable(seed), [np.zeros(5, np.float32)]))
    with pytest.raises(ValueError, match="must return"):
        family_with(lambda seed: trainable(seed))
    with pytest.raises(ValueError, match="other values"):  # must agree with model_fn: describe() checksums seed 0
        family_with(lambda seed: (trainable(seed + 1), None))
    # checked at every draw, not only at construction
    shrinking = family_with(lambda seed: (trainable(seed) if seed == 0 else trainable(seed)[:-1], None))
    with pytest.raises(ValueError, match="gave 5 trainable values, the model has 6"):
        shrinking.sample(1)
