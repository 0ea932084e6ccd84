"""Meta-training curricula: a sequence of phases, each with its own unroll length, epochs, meta learning rate (and
its schedule), meta-loss and loss weights; each phase starts from the best φ of the one before.

    phases = parse_phases(["unroll_length=20,epochs=400,meta_loss=log",
                           "unroll_length=100,epochs=800,learning_rate=3e-4,meta_lr_decay=cosine"],
                          defaults=Phase(...), num_steps=100)

Values, not flags: the experiment binaries turn their `--phase` strings into `Phase`s here (a ValueError names
the bad phase and key), and `MetaTrainer` takes a phase's `learning_rate_schedule(num_steps)` and `weights(num_steps)`.
"""
import dataclasses

import keras
import numpy as np

from l2l_tf.training.meta_trainer import META_LOSSES

LOSS_WEIGHTS = ("uniform", "rising")
META_LR_DECAYS = ("none", "cosine")


def loss_weights(kind, num_steps):
    """w_1..w_T: "uniform" (paper: w_t = 1) or "rising" (w_t = max(1, t/10): late, small losses count as much as
    the early ones)."""
    if kind not in LOSS_WEIGHTS:
        raise ValueError(f"loss_weights must be one of {LOSS_WEIGHTS}, got {kind!r}")
    t = np.arange(1, num_steps + 1, dtype=np.float64)
    return np.ones(num_steps) if kind == "uniform" else np.maximum(1.0, t / 10.0)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One meta-training phase."""

    unroll_length: int = 20
    epochs: int = 1000
    learning_rate: float = 1e-3
    meta_lr_decay: str = "none"
    meta_loss: str = "sum"
    loss_weights: str = "uniform"

    def check(self, num_steps):
        """The problems of this phase for `num_steps` optimizee steps (an empty list when it is valid)."""
        problems = []
        if self.unroll_length < 1 or num_steps % self.unroll_length:
            problems.append(f"unroll_length must divide the number of steps ({num_steps})")
        if self.epochs < 1 or not self.learning_rate > 0:
            problems.append("epochs and learning_rate must be positive")
        for key, choices in (("meta_lr_decay", META_LR_DECAYS), ("meta_loss", tuple(META_LOSSES)),
                             ("loss_weights", LOSS_WEIGHTS)):
            if getattr(self, key) not in choices:
                problems.append(f"{key} must be one of {list(choices)}")
        return problems

    def learning_rate_schedule(self, num_steps):
        """The meta learning rate: constant, or a cosine decay to a tenth over the phase's meta-updates."""
        if self.meta_lr_decay == "none":
            return self.learning_rate
        meta_updates = self.epochs * (num_steps // self.unroll_length)
        return keras.optimizers.schedules.CosineDecay(self.learning_rate, decay_steps=meta_updates, alpha=0.1)

    def weights(self, num_steps):
        return loss_weights(self.loss_weights, num_steps)

    def as_dict(self):
        return dataclasses.asdict(self)


KEYS = tuple(field.name for field in dataclasses.fields(Phase))


def parse_phase(spec, defaults: Phase, num_steps):
    """A Phase from "KEY=VALUE[,KEY=VALUE...]" (missing keys from `defaults`); ValueError naming what is wrong."""
    values = {}
    types = {field.name: field.type for field in dataclasses.fields(Phase)}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in types:
            raise ValueError(f"phase {spec!r}: unknown key {key!r}; keys: {', '.join(KEYS)}")
        try:
            values[key] = types[key](value.strip())
        except ValueError:
            raise ValueError(f"phase {spec!r}: bad value for {key}: {value!r}") from None
    phase = dataclasses.replace(defaults, **values)
    problems = phase.check(num_steps)
    if problems:
        raise ValueError(f"phase {spec!r}: " + "; ".join(problems))
    return phase


def parse_phases(specs, defaults: Phase, num_steps):
    """The phases of a curriculum ([defaults] when `specs` is empty)."""
    return [parse_phase(spec, defaults, num_steps) for spec in (specs or [""])]
