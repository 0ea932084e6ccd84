"""The import path of the LSTM rule before `l2l_tf.rules` (kept for existing code): see l2l_tf/rules/."""
from l2l_tf.rules import LSTMUpdateRule, RuleState, load_phi, save_phi

LSTMOptimizerState = RuleState  # LSTMOptimizerState((states,)) and .lstm still work

__all__ = ["LSTMUpdateRule", "LSTMOptimizerState", "load_phi", "save_phi"]
