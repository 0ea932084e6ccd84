"""Problem families: what the learned optimizer is trained and evaluated on.

A family draws problems from integer seeds. A problem is a `ProblemInstance`:
  params  tuple of float tensors, the optimizee's initial θ_0 (what the optimizer updates);
  extra   tuple of tensors carried from step to step but not optimized (e.g. batch-norm statistics); () if none;
  data    a nest of tensors that defines this problem (the quadratic's W and y, a data set and a minibatch seed).
The loss is a pure function `family.loss(params, extra, data, step) -> (loss, new_extra)`; `step` (an int32 scalar
tensor) lets a problem draw the minibatch of that step, so that every optimizer evaluated on the same problem sees
the same minibatches. Keeping the data in tensors (not in Python closures) lets one traced `tf.function` serve every
problem of a family.
"""
import abc
from typing import Any, NamedTuple

from l2l_tf.rules import param_specs


class ProblemInstance(NamedTuple):
    params: tuple
    extra: tuple
    data: Any


class ProblemFamily(abc.ABC):
    """A distribution over optimization problems that share one loss function and parameter shapes."""

    @abc.abstractmethod
    def sample(self, seed: int) -> ProblemInstance:
        """The problem drawn from `seed` (the same seed always gives the same problem)."""

    @abc.abstractmethod
    def loss(self, params, extra, data, step):
        """(scalar float32 loss of θ = params at this step, new extra)."""

    def param_specs(self):
        """A ParamSpec (path, shape, dtype) per optimizee tensor, in the order of `params` (what update rules route
        and size their state by). This default names them param0, param1, ... from the problem of seed 0; families
        whose tensors have names (KerasModelFamily: the variables' paths) override it."""
        return param_specs(self.sample(0).params)

    def describe(self):
        """JSON values that define this family's problems: what a checkpoint must match to be resumed. This default
        is the class and the tensors' specs; families add the arguments that define their problems."""
        return {"class": type(self).__name__,
                "param_specs": [[spec.name, list(spec.shape), spec.dtype] for spec in self.param_specs()]}


def seeds_for(split, count, base_seed=0):
    """Disjoint integer seed ranges for "train", "validation" and "test" problems."""
    offsets = {"train": 0, "validation": 1_000_000_007, "test": 2_000_000_014}
    if split not in offsets:
        raise ValueError(f"split must be one of {sorted(offsets)}, got {split!r}")
    start = offsets[split] + 100_003 * int(base_seed)
    return [start + i for i in range(count)]
