"""Float64 NumPy statement of the step in csrc/lstm_step.h, independent of TensorFlow, and the shared test inputs.

φ is the named tree (gate order i, f, g, o)
    {"lstm1": {"w": [4·H1, D+H1], "b": [4·H1]}, "lstm2": {"w": [4·H2, H1+H2], "b": [4·H2]},
     "out": {"w": [H2], "b": [1]}}
with D = 1 for preprocess "none" and 2 otherwise. This module knows nothing of the flat φ the kernels read: callers
that hand φ to a kernel flatten the tree with l2l_tf/ops/layout.py.

Used by the kernel tests (tests/conftest.py puts tools/ on sys.path) and by tools/gpu_check.py (a machine without
TensorFlow), so it imports only NumPy.
"""
import numpy as np

PREPROCESS = {"none": 0, "paper": 1, "clamped": 2}
FLT_EPSILON = float(np.finfo(np.float32).eps)
FLT_MAX = float(np.finfo(np.float32).max)

# The gradients every kernel test starts with (float32): zeros, tiny, subnormal (down to the smallest one), huge (up to
# near FLT_MAX), ±1. The values straddling the preprocessing kinks are added by `extreme_gradients`.
SPECIAL_GRADIENTS = (0.0, -0.0,
                     1e-30, -1e-30,
                     1e-40, -1e-42, 1.4e-45,
                     1e30, -1e30, 3e38, -3e38,
                     1.0, -1.0)
# Where the preprocessing has a kink: |g| = e^-p ("paper", default p = 10) and |g| = e^-k ("clamped", default k = 5).
DEFAULT_KINK_PARAMS = (10.0, 5.0)


def extreme_gradients(rng, n, kink_params=DEFAULT_KINK_PARAMS):
    """[n] float32 gradients: first the special values, then random magnitudes 10^U(-12, 4) with random signs.

    The special values are SPECIAL_GRADIENTS followed by, for each p in `kink_params`, ±e^-p·1.001 and ±e^-p·0.999
    (just above and just below the kink of "paper" with parameter p and of "clamped" with k = p). When n is smaller
    than the number of special values only the first n are used. The random part is drawn for all n positions (so the
    stream of `rng` after the call depends only on n).
    """
    kinks = []
    for p in kink_params:
        edge = np.exp(-float(p))
        kinks += [edge * 1.001, -edge * 1.001, edge * 0.999, -edge * 0.999]
    special = np.array(SPECIAL_GRADIENTS + tuple(kinks), np.float32)
    g = (rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-12, 4, n)).astype(np.float32)
    k = min(n, len(special))
    g[:k] = special[:k]
    return g


def input_features(preprocess):
    """D: gradient features per coordinate (1 for the raw gradient, 2 for LogAndSign)."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {sorted(PREPROCESS)}, got {preprocess!r}")
    return 1 if preprocess == "none" else 2


def phi_tree_shapes(hidden1, hidden2, preprocess):
    """The shapes of the φ tree's leaves, as this statement of the step uses them."""
    d, h1, h2 = input_features(preprocess), hidden1, hidden2
    return {"lstm1": {"w": (4 * h1, d + h1), "b": (4 * h1,)},
            "lstm2": {"w": (4 * h2, h1 + h2), "b": (4 * h2,)},
            "out": {"w": (h2,), "b": (1,)}}


def random_phi_tree(rng, hidden1, hidden2, preprocess, std=0.4):
    """A float32 φ tree with N(0, std²) entries (drawn leaf by leaf: lstm1 w, b; lstm2 w, b; out w, b)."""
    shapes = phi_tree_shapes(hidden1, hidden2, preprocess)
    return {layer: {part: (rng.standard_normal(shapes[layer][part]) * std).astype(np.float32)
                    for part in ("w", "b")}
            for layer in ("lstm1", "lstm2", "out")}


def _checked_tree(phi_tree, hidden1, hidden2, preprocess):
    """The tree's leaves as float64 arrays, after checking that they have the shapes of these sizes."""
    if not isinstance(phi_tree, dict):
        raise TypeError(f"φ must be the named tree {{'lstm1': {{'w', 'b'}}, 'lstm2': ..., 'out': ...}}, got "
                        f"{type(phi_tree).__name__} (flatten/unflatten with l2l_tf/ops/layout.py)")
    shapes = phi_tree_shapes(hidden1, hidden2, preprocess)
    out = {}
    for layer, parts in shapes.items():
        for part, shape in parts.items():
            leaf = np.asarray(phi_tree[layer][part], np.float64)
            if leaf.shape != shape:
                raise ValueError(f"φ[{layer!r}][{part!r}] has shape {leaf.shape}, expected {shape} for hidden sizes "
                                 f"{hidden1}/{hidden2} and preprocess {preprocess!r}")
            out.setdefault(layer, {})[part] = leaf
    return out


def preprocess_np(g, preprocess, param):
    """The gradient features [D, N] (float64). ±inf act as ±FLT_MAX (the largest finite float32 gradient of that sign,
    csrc/lstm_step.h); NaN gives NaN features (np.clip keeps NaN)."""
    g = np.clip(np.asarray(g, np.float64), -FLT_MAX, FLT_MAX)
    if preprocess == "none":
        return g[None, :]
    if preprocess == "paper":
        p = param
        big = np.abs(g) >= np.exp(-p)
        with np.errstate(divide="ignore"):
            f1 = np.where(big, np.log(np.abs(g)) / p, -1.0)
        f2 = np.where(big, np.sign(g), np.exp(p) * g)
        return np.stack([f1, f2])
    if preprocess == "clamped":
        k = param
        f1 = np.maximum(np.log(np.abs(g) + FLT_EPSILON) / k, -1.0)
        f2 = np.clip(g * np.exp(k), -1.0, 1.0)
        return np.stack([f1, f2])
    raise ValueError(preprocess)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _cell(w, b, inp, c, hidden):
    z = w @ inp + b[:, None]
    i, f, g, o = (z[k * hidden:(k + 1) * hidden] for k in range(4))
    c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c_new), c_new


def lstm_step_np(phi_tree, grad, state, scale, hidden1=20, hidden2=20, preprocess="none", param=10.0):
    """Returns (update [N], new_state [S, N]) in float64; φ is the named tree, state rows are h1, c1, h2, c2."""
    p = _checked_tree(phi_tree, hidden1, hidden2, preprocess)
    state = np.asarray(state, np.float64)
    if state.shape[0] != 2 * (hidden1 + hidden2):
        raise ValueError(f"state has {state.shape[0]} rows, expected 2·({hidden1} + {hidden2})")
    h1, c1 = state[:hidden1], state[hidden1:2 * hidden1]
    h2, c2 = state[2 * hidden1:2 * hidden1 + hidden2], state[2 * hidden1 + hidden2:]
    x = preprocess_np(grad, preprocess, param)
    h1n, c1n = _cell(p["lstm1"]["w"], p["lstm1"]["b"], np.concatenate([x, h1]), c1, hidden1)
    h2n, c2n = _cell(p["lstm2"]["w"], p["lstm2"]["b"], np.concatenate([h1n, h2]), c2, hidden2)
    update = scale * (p["out"]["w"] @ h2n + p["out"]["b"][0])
    return update, np.concatenate([h1n, c1n, h2n, c2n])
