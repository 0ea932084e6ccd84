"""l2l_tf: learned optimizers for TensorFlow/Keras ("Learning to learn by gradient descent by gradient descent").

    l2l_tf.rules      update rules (UpdateRule, LSTMUpdateRule, Partitioned), φ files
    l2l_tf.problems   problem families        l2l_tf.datasets   data sets
    l2l_tf.training   meta-training           l2l_tf.ops        fused op / pure-TF switch
    l2l_tf.LearnedOptimizer                   any rule as a Keras 3 optimizer
"""
from l2l_tf import ops
from l2l_tf.rules import (LSTMUpdateRule, ParamSpec, Partitioned, RuleState, UpdateRule, load_phi, rule_from_config,
                          rule_to_config, save_phi)
from l2l_tf.update_rule import LSTMOptimizerState
from l2l_tf.keras_optimizer import LearnedOptimizer

__version__ = "0.1.0"

__all__ = ["ops", "UpdateRule", "LSTMUpdateRule", "Partitioned", "ParamSpec", "RuleState", "LSTMOptimizerState",
           "rule_from_config", "rule_to_config", "load_phi", "save_phi", "LearnedOptimizer"]
