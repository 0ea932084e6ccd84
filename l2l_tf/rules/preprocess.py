"""Gradient preprocessing for coordinatewise rules: LogAndSign (paper, Appendix A) and the release's variant.

    "none"     the raw gradient, 1 feature (the quadratic experiment);
    "paper"    (log|g|/p, sgn g) when |g| ≥ e^{-p}, else (−1, e^p g); p = 10 by default;
    "clamped"  the authors' release: (max(log(|g| + ε)/k, −1), clip(g e^k, −1, 1)); k = 5 by default.

One `Preprocessing` value names a form and its parameter; rules, flags and docs take the modes and the help text
from here. The fused kernels implement the same forms (the ops layer checks the parameter's range).
"""
import dataclasses

from l2l_tf import ops

MODES = ops.PREPROCESS_MODES
DEFAULT_PARAM = dict(ops.DEFAULT_PREPROCESS_PARAM)
HELP = ("gradient preprocessing: 'paper' (LogAndSign, Appendix A, p = 10), 'clamped' (the authors' release's "
        "LogAndSign, k = 5) or 'none' (the raw gradient)")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """A preprocessing form (`mode`, one of MODES) and its parameter (p or k; None picks the default)."""

    mode: str = "paper"
    param: float = None

    def __post_init__(self):
        config = ops.StepConfig(1, 1, self.mode, self.param)  # the one validation of mode and parameter
        object.__setattr__(self, "param", config.preprocess_param)

    @property
    def num_features(self):
        """D: features per coordinate."""
        return ops.layout.input_size(self.mode)

    def features(self, grad):
        """[D, N] features of a flat [N] gradient (pure TF, differentiable)."""
        return ops.preprocess(grad, ops.StepConfig(1, 1, self.mode, self.param))
