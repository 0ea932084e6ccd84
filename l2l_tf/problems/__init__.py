"""Problem families, one per file: what learned optimizers are meta-trained and evaluated on.

    base.py         ProblemFamily, ProblemInstance, seeds_for (disjoint train/validation/test seeds)
    quadratic.py    QuadraticFamily (paper Fig. 4, left)
    keras_model.py  KerasModelFamily (any Keras model, data set and loss)
    mnist.py        the paper's MNIST MLP and its transfer settings
"""
from l2l_tf.problems.base import ProblemFamily, ProblemInstance, seeds_for
from l2l_tf.problems.keras_model import KerasModelFamily
from l2l_tf.problems.quadratic import QuadraticFamily

__all__ = ["ProblemFamily", "ProblemInstance", "seeds_for", "QuadraticFamily", "KerasModelFamily"]
