"""Update rules: the learned optimizers, one file per family, behind one interface (`base.UpdateRule`).

    lstm.py         LSTMUpdateRule, the paper's coordinatewise 2-layer LSTM ("lstm")
    partitioned.py  Partitioned, one sub-rule per group of parameter tensors ("partitioned")
    preprocess.py   gradient preprocessing (LogAndSign)
    phi_files.py    φ files (save_phi / load_phi)

Configs and files name rules through the registry: `rule_to_config(rule)` / `rule_from_config(config)`.
"""
from l2l_tf.rules.base import (RULES, ParamSpec, RuleState, UpdateRule, leaf_paths, param_specs, register_rule,
                               rule_from_config, rule_to_config, tree_from_paths)
from l2l_tf.rules.lstm import LSTMUpdateRule
from l2l_tf.rules.partitioned import PREDICATES, Partitioned, register_predicate
from l2l_tf.rules.phi_files import load_phi, save_phi
from l2l_tf.rules.preprocess import Preprocessing

__all__ = ["RULES", "ParamSpec", "RuleState", "UpdateRule", "leaf_paths", "param_specs", "register_rule",
           "rule_from_config", "rule_to_config", "tree_from_paths", "LSTMUpdateRule", "Partitioned", "PREDICATES", "register_predicate",
           "load_phi", "save_phi", "Preprocessing"]
