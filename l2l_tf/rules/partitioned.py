"""`Partitioned`: routes each parameter tensor to one named sub-rule (like optax `multi_transform` and Keras
`MultiOptimizer`), e.g. the paper's CIFAR-10 optimizer, one LSTM for the conv kernels and one for the rest:

    Partitioned({"conv": LSTMUpdateRule(), "other": LSTMUpdateRule()}, assign=[("conv", "rank>=4")], default="other")

`assign` is an ordered list of (group, matcher); a tensor goes to the group of the first matcher it satisfies, else
to `default`. A matcher is a named predicate of the registry below (e.g. "rank>=4") or else a regular expression
searched in the tensor's path ("conv2d.*/kernel"). Both are strings, so the rule serialises into φ files, checkpoints
and `.keras` files. φ and the shared state are dicts keyed by group; each per-coordinate state entry is a one-key
dict {group: the sub-rule's entry}, so the routing travels with the state through `tf.function` and Keras variables.
"""
import operator
import re

from l2l_tf.rules.base import RuleState, UpdateRule, param_specs, register_rule, rule_from_config, rule_to_config

_COMPARISONS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}
_RANK_PREDICATE = re.compile(r"^rank(>=|<=|==|>|<)(\d+)$")

# Named predicates on a ParamSpec, beyond the rank comparisons ("rank>=4", "rank==1", ...) that are always known.
PREDICATES = {
    "scalar": lambda spec: spec.rank == 0,
}


def register_predicate(name, predicate):
    """Adds a named matcher `predicate(ParamSpec) -> bool` (register it before loading files that use it)."""
    if _RANK_PREDICATE.match(name):
        raise ValueError(f"{name!r} is a built-in rank predicate")
    PREDICATES[name] = predicate


def matcher(pattern):
    """The predicate of a matcher string: a named predicate, a rank comparison, or a regex on the path."""
    if not isinstance(pattern, str):
        raise TypeError(f"a matcher is a string (a named predicate or a regex), got {pattern!r}")
    if pattern in PREDICATES:
        return PREDICATES[pattern]
    rank = _RANK_PREDICATE.match(pattern)
    if rank:
        compare, value = _COMPARISONS[rank.group(1)], int(rank.group(2))
        return lambda spec: compare(spec.rank, value)
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"matcher {pattern!r} is neither a named predicate ({sorted(PREDICATES)} or rank<op>N) "
                         f"nor a valid regular expression ({error})") from None
    return lambda spec: regex.search(spec.name) is not None


@register_rule("partitioned")
class Partitioned(UpdateRule):
    """Each parameter tensor is updated by the sub-rule of its group; φ and shared state are dicts by group.

    Args:
        rules: {group name: UpdateRule}.
        assign: ordered [(group, matcher)]; the first match wins.
        default: the group of tensors no matcher matches (default: the last group of `rules`).
    """

    def __init__(self, rules, assign=(), default=None):
        if not isinstance(rules, dict) or not rules:
            raise ValueError("rules must be a non-empty dict {group: UpdateRule}")
        for group, rule in rules.items():
            if not isinstance(group, str) or not isinstance(rule, UpdateRule):
                raise TypeError(f"rules maps group names to UpdateRules, got {group!r}: {rule!r}")
        self.rules = dict(rules)
        self.assign = tuple((str(group), pattern) for group, pattern in assign)
        self.default = list(self.rules)[-1] if default is None else default
        for group in [g for g, _ in self.assign] + [self.default]:
            if group not in self.rules:
                raise ValueError(f"group {group!r} has no rule; groups: {sorted(self.rules)}")
        self._matchers = [(group, matcher(pattern)) for group, pattern in self.assign]

    @property
    def coordinatewise(self):
        return all(rule.coordinatewise for rule in self.rules.values())

    @property
    def supports_fused(self):
        return all(rule.supports_fused for rule in self.rules.values())

    @property
    def has_lstm_gemms(self):
        return any(rule.has_lstm_gemms for rule in self.rules.values())

    def group_of(self, spec):
        """The group of one ParamSpec."""
        return next((group for group, match in self._matchers if match(spec)), self.default)

    def groups(self, param_specs_or_params):
        """The group of each tensor, in order."""
        return [self.group_of(spec) for spec in param_specs(param_specs_or_params)]

    def get_config(self):
        return {"rules": {group: rule_to_config(rule) for group, rule in self.rules.items()},
                "assign": [[group, pattern] for group, pattern in self.assign], "default": self.default}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["rules"] = {group: rule_from_config(c) for group, c in config["rules"].items()}
        return cls(**config)

    def phi_shapes(self):
        return {group: rule.phi_shapes() for group, rule in self.rules.items()}

    def init_phi(self, seed=0):
        """Each group's fresh φ; group i draws from seed + i (two groups of one rule start different)."""
        return {group: rule.init_phi(seed + i) for i, (group, rule) in enumerate(self.rules.items())}

    def init_state(self, param_specs_or_params):
        specs = param_specs(param_specs_or_params)
        groups = [self.group_of(spec) for spec in specs]
        per_coordinate, shared = [None] * len(specs), {}
        for group, rule in self.rules.items():
            members = [i for i, g in enumerate(groups) if g == group]
            state = rule.init_state([specs[i] for i in members])
            for i, entry in zip(members, state.per_coordinate):
                per_coordinate[i] = {group: entry}
            shared[group] = state.shared
        return RuleState(tuple(per_coordinate), shared)

    def step(self, phi, grads, state, *, implementation="auto"):
        self.check_implementation(implementation)
        grads = self.check_grads(grads, state)
        groups = [next(iter(entry)) for entry in state.per_coordinate]  # each entry is {group: sub-rule entry}
        updates, per_coordinate, shared = [None] * len(grads), list(state.per_coordinate), dict(state.shared)
        for group, rule in self.rules.items():
            members = [i for i, g in enumerate(groups) if g == group]
            if not members:  # nothing to update: the group's shared state stays as it is
                continue
            sub_state = RuleState(tuple(state.per_coordinate[i][group] for i in members), state.shared[group])
            sub_updates, sub_state = rule.step(phi[group], [grads[i] for i in members], sub_state,
                                               implementation=implementation)
            for i, update, entry in zip(members, sub_updates, sub_state.per_coordinate):
                updates[i], per_coordinate[i] = update, {group: entry}
            shared[group] = sub_state.shared
        return updates, RuleState(tuple(per_coordinate), shared)
