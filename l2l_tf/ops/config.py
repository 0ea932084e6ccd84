"""Static configuration of the LSTM step, shared by the reference and the fused op."""
import dataclasses
import math

from l2l_tf.ops import layout

PREPROCESS_MODES = ("none", "paper", "clamped")
DEFAULT_PREPROCESS_PARAM = {"none": 0.0, "paper": 10.0, "clamped": 5.0}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Shape of the coordinatewise LSTM and its input features.

    Args:
        hidden1: units of the first LSTM layer.
        hidden2: units of the second LSTM layer.
        preprocess: "none" (raw gradient, 1 feature), "paper" (LogAndSign with threshold e^{-p}) or
            "clamped" (the authors' release's continuous LogAndSign with k).
        preprocess_param: p for "paper" (default 10), k for "clamped" (default 5).
    """

    hidden1: int = 20
    hidden2: int = 20
    preprocess: str = "paper"
    preprocess_param: float = None

    def __post_init__(self):
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")
        for name in ("hidden1", "hidden2"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        param = self.preprocess_param
        if param is None:
            param = DEFAULT_PREPROCESS_PARAM[self.preprocess]
        param = float(param)
        if self.preprocess != "none" and not (math.isfinite(param) and param > 0):
            raise ValueError(f"preprocess_param must be a finite positive number, got {param!r}")
        object.__setattr__(self, "preprocess_param", param)

    @property
    def input_size(self):
        return layout.input_size(self.preprocess)

    @property
    def state_rows(self):
        """S: rows of the per-coordinate state, h1 | c1 | h2 | c2."""
        return 2 * (self.hidden1 + self.hidden2)

    @property
    def phi_shapes(self):
        """The φ tree's leaf shapes: {"lstm1": {"w", "b"}, "lstm2": {"w", "b"}, "out": {"w", "b"}}."""
        return layout.phi_shapes(self.hidden1, self.hidden2, self.input_size)

    @property
    def num_params(self):
        """P: the number of weights in φ."""
        return layout.num_params(self.hidden1, self.hidden2, self.input_size)
