"""The fused kernels' flat φ layout (csrc/lstm_step.h): the one place that knows it.

Everywhere else φ is a named tree,
    {"lstm1": {"w": [4·H1, D+H1], "b": [4·H1]}, "lstm2": {"w": [4·H2, H1+H2], "b": [4·H2]}, "out": {"w": [H2], "b": [1]}}
(gate order i, f, g, o), and the kernels read these leaves concatenated in `LEAVES` order. No TensorFlow here, so
that tools/gpu_check.py can use it on a machine without TensorFlow; the functions take the array module's
`concat`/`reshape`, so the same code flattens numpy arrays and (differentiably) TF tensors.
"""
import math

import numpy as np

LEAVES = (("lstm1", "w"), ("lstm1", "b"), ("lstm2", "w"), ("lstm2", "b"), ("out", "w"), ("out", "b"))


def input_size(preprocess):
    """D: gradient features per coordinate (1 for the raw gradient, 2 for LogAndSign)."""
    return 1 if preprocess == "none" else 2


def phi_shapes(hidden1, hidden2, input_size):
    """The φ tree's leaf shapes for these sizes."""
    d, h1, h2 = input_size, hidden1, hidden2
    return {"lstm1": {"w": (4 * h1, d + h1), "b": (4 * h1,)},
            "lstm2": {"w": (4 * h2, h1 + h2), "b": (4 * h2,)},
            "out": {"w": (h2,), "b": (1,)}}


def num_params(hidden1, hidden2, input_size):
    """P: the length of the flat φ."""
    shapes = phi_shapes(hidden1, hidden2, input_size)
    return sum(math.prod(shapes[layer][part]) for layer, part in LEAVES)


def flatten(tree, concat=np.concatenate, reshape=np.reshape):
    """The flat [P] φ the kernels read, from a φ tree."""
    return concat([reshape(tree[layer][part], [-1]) for layer, part in LEAVES], 0)


def unflatten(flat, hidden1, hidden2, input_size, reshape=np.reshape):
    """The φ tree of a flat [P] φ (slices of `flat`, so gradients flow through for TF tensors)."""
    shapes = phi_shapes(hidden1, hidden2, input_size)
    expected = num_params(hidden1, hidden2, input_size)
    if int(flat.shape[0]) != expected:
        raise ValueError(f"a flat φ for hidden sizes {hidden1}/{hidden2} and {input_size} input features has "
                         f"{expected} elements, got {flat.shape[0]}")
    tree, start = {}, 0
    for layer, part in LEAVES:
        shape = shapes[layer][part]
        stop = start + math.prod(shape)
        tree.setdefault(layer, {})[part] = reshape(flat[start:stop], shape)
        start = stop
    return tree
