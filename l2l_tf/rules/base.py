"""The update-rule interface every learned optimizer implements, the state it keeps and the rule registry.

    rule = LSTMUpdateRule()                       # or Partitioned({...}), or any registered rule
    phi = rule.init_phi(seed=0)                   # a named tree (nested dict) of float32 tensors
    state = rule.init_state(param_specs)          # a RuleState: per-coordinate parts + shared parts
    updates, state = rule.step(phi, grads, state) # θ ← θ + updates

The shape of the API follows optax (pure `init`/`update`, state as named tuples); φ is a named tree as in
learned_optimization. A rule is a frozen description (its `get_config()` is JSON and names nothing about how it
runs); how the step runs (`implementation`) is an argument of `step`, chosen at run time.
"""
import abc
import math
from typing import Any, NamedTuple

import tensorflow as tf

from l2l_tf import ops


class ParamSpec(NamedTuple):
    """What a rule knows of one optimizee tensor: its path (e.g. "dense/kernel"), static shape and dtype name."""

    name: str
    shape: tuple
    dtype: str = "float32"

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def rank(self):
        return len(self.shape)

    @classmethod
    def of(cls, tensor, name=None):
        """The spec of a tensor or variable (a Keras variable's `path` names it unless `name` is given)."""
        shape = tf.TensorShape(tensor.shape)
        if not shape.is_fully_defined():
            raise ValueError(f"parameter tensors need a fully known shape, got {shape} for {name or tensor!r}")
        if name is None:
            name = getattr(tensor, "path", None) or getattr(tensor, "name", None) or "param"
        return cls(str(name), tuple(int(d) for d in shape), tf.as_dtype(tensor.dtype).name)


def param_specs(params, names=None):
    """ParamSpecs of a sequence of tensors/variables (names default to their paths, else "param<i>")."""
    params = list(params)
    if names is None:
        names = [getattr(p, "path", None) or f"param{i}" for i, p in enumerate(params)]
    if len(names) != len(params):
        raise ValueError(f"got {len(names)} names for {len(params)} parameter tensors")
    return tuple(p if isinstance(p, ParamSpec) else ParamSpec.of(p, n) for p, n in zip(params, names))


class RuleState(NamedTuple):
    """A rule's state: per-coordinate parts and parts shared by all coordinates.

    per_coordinate: one entry per parameter tensor, in the order of the specs given to `init_state`, each a nest of
        2-D tensors [rows, size_i] whose columns belong to that tensor's coordinates (so a sparse step may gather
        and scatter columns). A partitioned rule wraps each entry in a one-key dict naming the tensor's group.
    shared: a nest of tensors read and written across coordinates (a memory, a step count); () for none.
    """

    per_coordinate: tuple = ()
    shared: Any = ()

    @property
    def lstm(self):
        """The per-coordinate states (the name of this field before rules/; kept for old code)."""
        return self.per_coordinate


class UpdateRule(abc.ABC):
    """A learned update rule: φ (a named tree of weights) maps gradients and a state to updates.

    Subclasses set `name` (their registry key) and implement the abstract methods; `get_config()` must return
    JSON-serialisable values and `from_config(get_config())` an equal rule. `coordinatewise` rules (each
    coordinate's update depends only on its own gradient and state, no shared state) may be stepped on any subset
    of tensors or coordinates: the Keras optimizer then steps variables one by one and sparse gradients row by row.
    `supports_fused` says whether the fused op can run the rule; where it cannot, implementation="auto" runs the
    pure-TF path and "fused" is an error. `has_lstm_gemms` says whether some of its steps run the LSTM's GEMMs, the
    ones `ops.matmul_precision` sets the precision of (a "bfloat16" choice is an error for a rule without them).
    """

    name = None
    coordinatewise = True
    supports_fused = False
    has_lstm_gemms = False

    @abc.abstractmethod
    def phi_shapes(self):
        """The φ tree's leaf shapes (a nested dict of tuples)."""

    @abc.abstractmethod
    def init_phi(self, seed=0):
        """A fresh φ tree of float32 tensors, deterministic in `seed`."""

    @abc.abstractmethod
    def init_state(self, param_specs):
        """The initial RuleState for these optimizee tensors (ParamSpecs, or tensors/variables)."""

    @abc.abstractmethod
    def step(self, phi, grads, state, *, implementation="auto"):
        """(updates, new state) for `grads` (one per tensor of `init_state`, same shapes and dtypes)."""

    @abc.abstractmethod
    def get_config(self):
        """The rule's hyperparameters as JSON values (never how it runs)."""

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def check_phi(self, phi):
        """Raises ValueError naming the first leaf of `phi` missing, extra or of the wrong shape."""
        _check_tree(self.as_phi_tree(phi), self.phi_shapes(), "phi")

    def as_phi_tree(self, phi):
        """`phi` as this rule's named tree (rules with an older flat form convert it here)."""
        if not isinstance(phi, dict):
            raise ValueError(f"phi of the {self.name!r} rule must be a tree {self.phi_shapes()}, got "
                             f"{type(phi).__name__}")
        return phi

    @staticmethod
    def check_grads(grads, state):
        """`grads` as a list, one per tensor of `state` (ValueError otherwise)."""
        grads = list(grads)
        if len(grads) != len(state.per_coordinate):
            raise ValueError(f"got {len(grads)} gradients for an optimizer state of {len(state.per_coordinate)} "
                             "tensors")
        return grads

    def check_implementation(self, implementation):
        """Validates `implementation` for this rule: "fused" needs the op and a rule the op can run."""
        ops.check_implementation(implementation)
        if implementation == "fused" and not self.supports_fused:
            raise ValueError(f"implementation='fused': the fused op cannot run the {self.name!r} rule; use "
                             "implementation='auto' (the pure-TF path) or 'reference'")
        return implementation

    def check_matmul_precision(self, precision):
        """Validates a `matmul_precision` for this rule: other than "float32" it needs the LSTM's GEMMs to apply to."""
        ops.check_matmul_precision(precision)
        if precision != "float32" and not self.has_lstm_gemms:
            raise ValueError(f"matmul_precision={precision!r} sets the precision of the LSTM's GEMMs, and the "
                             f"{self.name!r} rule has none; use 'float32'")
        return precision

    def step_implementation(self, implementation):
        """What a step of this rule passes to the ops layer: "auto" runs the pure-TF path where the op can't run."""
        self.check_implementation(implementation)
        return implementation if self.supports_fused else "reference"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, repr(self.get_config())))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _check_tree(tree, shapes, path):
    if isinstance(shapes, dict):
        if not isinstance(tree, dict):
            raise ValueError(f"{path} must be a dict with keys {sorted(shapes)}, got {type(tree).__name__}")
        missing, extra = sorted(set(shapes) - set(tree)), sorted(set(tree) - set(shapes))
        if missing or extra:
            raise ValueError(f"{path}: missing leaves {missing}, unexpected {extra}")
        for key in shapes:
            _check_tree(tree[key], shapes[key], f"{path}/{key}")
        return
    shape = tuple(getattr(tree, "shape", ()))
    if shape != tuple(shapes):
        raise ValueError(f"{path} must have shape {tuple(shapes)}, got {shape}")


# ---- registry: configs, φ files and .keras files name rules ----
RULES = {}


def register_rule(name):
    """Class decorator: makes a rule loadable from configs as `{"name": name, "config": ...}`."""

    def register(cls):
        if name in RULES and RULES[name] is not cls:
            raise ValueError(f"an update rule named {name!r} is already registered ({RULES[name].__name__})")
        cls.name = name
        RULES[name] = cls
        return cls

    return register


def rule_to_config(rule):
    """{"name": registry name, "config": rule.get_config()}: what φ files, checkpoints and .keras files store."""
    if not isinstance(rule, UpdateRule) or RULES.get(rule.name) is not type(rule):
        raise TypeError(f"{rule!r} is not a registered UpdateRule (see l2l_tf.rules.register_rule)")
    return {"name": rule.name, "config": rule.get_config()}


def rule_from_config(config):
    """The rule of a `rule_to_config` dict; ValueError naming the problem for an unknown name or bad arguments."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"an update-rule config is {{'name': ..., 'config': {{...}}}}, got {config!r}")
    name = config["name"]
    if name not in RULES:
        raise ValueError(f"unknown update rule {name!r}; registered: {sorted(RULES)}")
    try:
        return RULES[name].from_config(dict(config.get("config", {})))
    except TypeError as error:
        raise ValueError(f"bad configuration for the {name!r} rule: {config.get('config')} ({error})") from error


def leaf_paths(tree, prefix=""):
    """[("a/b", leaf)] of a φ-like tree: nested dicts whose leaves are anything else (arrays, tensors, shape tuples),
    keys sorted as tf.nest orders them. The names φ files, checkpoints and optimizer variables use."""
    if isinstance(tree, dict):
        return [item for key in sorted(tree) for item in leaf_paths(tree[key], f"{prefix}{key}/")]
    return [(prefix[:-1], tree)]


def tree_from_paths(items):
    """The nested dict of [("a/b", leaf)] (the inverse of `leaf_paths`)."""
    tree = {}
    for path, leaf in items:
        *parents, last = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree
