"""Float64 NumPy statement of the step in csrc/lstm_step.h, independent of TensorFlow.

Used by the kernel tests here and by tools/gpu_check (a machine without TensorFlow).
"""
import numpy as np

PREPROCESS = {"none": 0, "paper": 1, "clamped": 2}
FLT_EPSILON = float(np.finfo(np.float32).eps)


def input_size(preprocess):
    return 1 if preprocess == "none" else 2


def num_params(hidden1, hidden2, preprocess):
    d = input_size(preprocess)
    return 4 * hidden1 * (d + hidden1) + 4 * hidden1 + 4 * hidden2 * (hidden1 + hidden2) + 4 * hidden2 + hidden2 + 1


def unpack_phi(phi, hidden1, hidden2, preprocess):
    d = input_size(preprocess)
    sizes = [("w1", (4 * hidden1, d + hidden1)), ("b1", (4 * hidden1,)),
             ("w2", (4 * hidden2, hidden1 + hidden2)), ("b2", (4 * hidden2,)),
             ("wo", (hidden2,)), ("bo", (1,))]
    out, pos = {}, 0
    for name, shape in sizes:
        size = int(np.prod(shape))
        out[name] = np.asarray(phi[pos:pos + size], np.float64).reshape(shape)
        pos += size
    assert pos == len(phi), (pos, len(phi))
    return out


def preprocess_np(g, preprocess, param):
    g = np.asarray(g, np.float64)
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


def lstm_step_np(phi, grad, state, scale, hidden1=20, hidden2=20, preprocess="none", param=10.0):
    """Returns (update [N], new_state [S, N]) in float64."""
    p = unpack_phi(phi, hidden1, hidden2, preprocess)
    state = np.asarray(state, np.float64)
    h1, c1 = state[:hidden1], state[hidden1:2 * hidden1]
    h2, c2 = state[2 * hidden1:2 * hidden1 + hidden2], state[2 * hidden1 + hidden2:]
    x = preprocess_np(grad, preprocess, param)
    h1n, c1n = _cell(p["w1"], p["b1"], np.concatenate([x, h1]), c1, hidden1)
    h2n, c2n = _cell(p["w2"], p["b2"], np.concatenate([h1n, h2]), c2, hidden2)
    update = scale * (p["wo"] @ h2n + p["bo"][0])
    return update, np.concatenate([h1n, c1n, h2n, c2n])
