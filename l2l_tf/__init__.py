"""l2l_tf: learned optimizers for TensorFlow/Keras ("Learning to learn by gradient descent by gradient descent")."""
from l2l_tf import ops
from l2l_tf.update_rule import LSTMOptimizerState, LSTMUpdateRule, load_phi, save_phi
from l2l_tf.keras_optimizer import LearnedOptimizer

__version__ = "0.1.0"

__all__ = ["ops", "LSTMUpdateRule", "LSTMOptimizerState", "load_phi", "save_phi", "LearnedOptimizer"]
