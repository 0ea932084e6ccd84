"""The import path of the meta-trainer before `l2l_tf.training` (kept for existing code): see l2l_tf/training/."""
from l2l_tf.training.meta_trainer import LOG_LOSS_FLOOR, META_LOSSES, MetaTrainer

__all__ = ["MetaTrainer", "META_LOSSES", "LOG_LOSS_FLOOR"]
