"""Quadratic problems (paper Fig. 4, left): f(θ) = mean_b ‖W_b θ_b − y_b‖²."""
import numpy as np
import tensorflow as tf

from l2l_tf.problems.base import ProblemFamily, ProblemInstance
from l2l_tf.rules import ParamSpec


class QuadraticFamily(ProblemFamily):
    """f(θ) = mean_b ‖W_b θ_b − y_b‖² over a batch of independent `num_dims`-dimensional least-squares problems.

    Args:
        batch_size: functions per problem (release: 128); each has its own W, y and θ.
        num_dims: dimension d of θ_b (paper: 10).
        distribution: "gaussian" (paper: W, y ~ N(0, 1)) or "uniform" (the authors' release: U[0, 1)).
        init_stddev: θ_0 ~ N(0, init_stddev²) (0.01).
    """

    def __init__(self, batch_size=128, num_dims=10, distribution="gaussian", init_stddev=0.01):
        if distribution not in ("gaussian", "uniform"):
            raise ValueError(f"distribution must be 'gaussian' or 'uniform', got {distribution!r}")
        if batch_size < 1 or num_dims < 1:
            raise ValueError(f"batch_size and num_dims must be positive, got {batch_size}, {num_dims}")
        self.batch_size, self.num_dims = int(batch_size), int(num_dims)
        self.distribution, self.init_stddev = distribution, float(init_stddev)

    def sample(self, seed):
        rng = np.random.default_rng(seed)
        shape_w, shape_y = (self.batch_size, self.num_dims, self.num_dims), (self.batch_size, self.num_dims)
        if self.distribution == "gaussian":
            w, y = rng.standard_normal(shape_w), rng.standard_normal(shape_y)
        else:
            w, y = rng.uniform(size=shape_w), rng.uniform(size=shape_y)
        theta = rng.normal(0.0, self.init_stddev, shape_y)
        as_tensor = lambda a: tf.constant(a, tf.float32)
        return ProblemInstance((as_tensor(theta),), (), (as_tensor(w), as_tensor(y)))

    def param_specs(self):
        return (ParamSpec("theta", (self.batch_size, self.num_dims), "float32"),)

    def describe(self):
        return {**super().describe(), "batch_size": self.batch_size, "num_dims": self.num_dims,
                "distribution": self.distribution, "init_stddev": self.init_stddev}

    def loss(self, params, extra, data, step):
        (theta,), (w, y) = params, data
        residual = tf.linalg.matvec(w, theta) - y
        return tf.reduce_mean(tf.reduce_sum(tf.square(residual), axis=-1)), extra
