"""Meta-training: the truncated-BPTT meta-trainer, curricula of phases, checkpoints.

    meta_trainer.py  MetaTrainer (any UpdateRule on any ProblemFamily)
    curriculum.py    Phase, parse_phases, loss_weights
    checkpoints.py   meta_trainer.npz save/restore (and the flat-φ checkpoints written before rules/)
"""
from l2l_tf.training.curriculum import Phase, loss_weights, parse_phase, parse_phases
from l2l_tf.training.meta_trainer import LOG_LOSS_FLOOR, META_LOSSES, MetaTrainer

__all__ = ["MetaTrainer", "META_LOSSES", "LOG_LOSS_FLOOR", "Phase", "loss_weights", "parse_phase", "parse_phases"]
