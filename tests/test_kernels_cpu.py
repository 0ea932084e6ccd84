"""The CPU kernels (csrc/lstm_step_cpu.cc) through the pybind11 module, against the float64 NumPy reference.

Skips when the extension is not built (`pip install -e .`); with L2L_TF_OPS_DIR set, tests the module in that directory
(l2l_tf/ops/library.py) and fails when it is not there.

The kernels take the flat float32 φ (`layout.flatten` of the tree); the reference (tools/lstm_step_numpy.py) takes the
tree. The gradients are the shared fixture `extreme_gradients` (special values first, then random magnitudes).
"""
import numpy as np
import pytest

from lstm_step_numpy import extreme_gradients, phi_tree_shapes, preprocess_np, random_phi_tree
from lstm_step_numpy import lstm_step_np as _lstm_step_np

from l2l_tf.ops import layout, library

try:  # the package's l2l_tf._kernels, or the one in L2L_TF_OPS_DIR (e.g. bazel-bin/csrc) when that is set
    K = library.load_kernels()
except library.OpsDirError:
    raise  # L2L_TF_OPS_DIR names a directory without a loadable module: an error, not a skip
except ImportError as e:  # not built
    pytest.skip(f"l2l_tf._kernels is not built ({e})", allow_module_level=True)


def lstm_step_np(phi_flat, grad, state, scale, h1, h2, pre, param):
    """The float64 reference on a flat φ (the kernels' argument), through `layout.unflatten`."""
    tree = layout.unflatten(np.asarray(phi_flat), h1, h2, layout.input_size(pre))
    with np.errstate(over="ignore"):  # exp overflow in the float64 sigmoid of huge gates: exact limits
        return _lstm_step_np(tree, grad, state, scale, h1, h2, pre, param)


MODES = [("none", 10.0), ("paper", 10.0), ("clamped", 5.0)]
SIZES = [(20, 20), (7, 5)]


def _inputs(rng, n, h1, h2, pre, kink_params=(10.0, 5.0)):
    """Flat float32 φ (the kernels' layout), the shared extreme gradients, a random state."""
    phi = layout.flatten(random_phi_tree(rng, h1, h2, pre, std=0.4))
    grad = extreme_gradients(rng, n, kink_params)
    state = (rng.standard_normal((2 * (h1 + h2), n)) * 0.6).astype(np.float32)
    return phi, grad, state


@pytest.mark.parametrize("pre,param", MODES)
@pytest.mark.parametrize("h1,h2", SIZES)
@pytest.mark.parametrize("n", [1000, 1536])
def test_forward_matches_numpy(pre, param, h1, h2, n):
    # 1000: rows not 64-byte aligned (ordinary stores), a padded partial chunk at the end;
    # 1536: aligned rows (streaming stores), whole chunks.
    rng = np.random.default_rng([len(pre), h1, h2, n])
    phi, grad, state = _inputs(rng, n, h1, h2, pre)
    update, new_state = K.forward_cpu(phi, grad, state, 0.1, h1, h2, pre, param)
    assert update.dtype == np.float32 and update.shape == (n,)
    assert new_state.dtype == np.float32 and new_state.shape == state.shape
    ref_u, ref_s = lstm_step_np(phi, grad, state, 0.1, h1, h2, pre, param)
    np.testing.assert_allclose(update, ref_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state, ref_s, rtol=1e-5, atol=1e-6)


def test_forward_num_params_and_small_n():
    rng = np.random.default_rng(3)
    for pre, _ in MODES:
        for h1, h2 in SIZES:
            assert K.num_params(h1, h2, pre) == layout.num_params(h1, h2, layout.input_size(pre))
            # The reference's tree is layout's tree, and flattens to the kernels' length.
            assert phi_tree_shapes(h1, h2, pre) == layout.phi_shapes(h1, h2, layout.input_size(pre))
            phi = layout.flatten(random_phi_tree(rng, h1, h2, pre))
            assert phi.dtype == np.float32 and phi.shape == (K.num_params(h1, h2, pre),)
    for n in (0, 1, 17, 256, 257):
        phi, grad, state = _inputs(rng, n, 7, 5, "paper", kink_params=(10.0, 5.0, 3.0))  # param 3 below: its kink
        update, new_state = K.forward_cpu(phi, grad, state, 0.5, 7, 5, "paper", 3.0)
        ref_u, ref_s = lstm_step_np(phi, grad, state, 0.5, 7, 5, "paper", 3.0)
        np.testing.assert_allclose(update, ref_u, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new_state, ref_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pre,param", MODES)
def test_forward_propagates_nan(pre, param):
    # A NaN gradient gives a NaN update and a NaN state column (documented in csrc/lstm_step.h); the other
    # coordinates are untouched. 300: NaN in a whole chunk (5) and in the partial last one (290).
    rng = np.random.default_rng(4)
    phi, grad, state = _inputs(rng, 300, 7, 5, pre)
    grad[[5, 290]] = np.nan
    update, new_state = K.forward_cpu(phi, grad, state, 1.0, 7, 5, pre, param)
    assert np.isnan(update[[5, 290]]).all() and np.isfinite(np.delete(update, [5, 290])).all()
    assert np.isnan(new_state[:, [5, 290]]).all() and np.isfinite(np.delete(new_state, [5, 290], axis=1)).all()


@pytest.mark.parametrize("pre,param", MODES)
def test_backward_propagates_nan(pre, param):
    # The backward of a NaN gradient: NaN d_grad at that coordinate (every preprocessing form), the other
    # coordinates' d_grad finite.
    rng = np.random.default_rng(5)
    phi, grad, state = _inputs(rng, 300, 7, 5, pre)
    grad[[5, 290]] = np.nan
    du = rng.standard_normal(300).astype(np.float32)
    _, d_grad, _ = K.backward_cpu(phi, grad, state, 1.0, du, None, 7, 5, pre, param)
    assert np.isnan(d_grad[[5, 290]]).all() and np.isfinite(np.delete(d_grad, [5, 290])).all()


FLT_MAX = float(np.finfo(np.float32).max)
INF_PAIRS = ((0, 2), (1, 3), (280, 282), (281, 283))  # (±inf, ±FLT_MAX) coordinates with equal states


def _infinite_inputs(rng, n, h1, h2, pre):
    """Inputs with +inf, -inf, +FLT_MAX, -FLT_MAX at coordinates 0..3 (a whole chunk) and 280..283 (the partial
    last chunk of n = 300); each ±inf coordinate has the state of its ±FLT_MAX partner."""
    phi, grad, state = _inputs(rng, n, h1, h2, pre)
    for base in (0, 280):
        grad[base:base + 4] = [np.inf, -np.inf, FLT_MAX, -FLT_MAX]
    for a, b in INF_PAIRS:
        state[:, a] = state[:, b]
    return phi, grad, state


@pytest.mark.parametrize("pre,param", MODES)
@pytest.mark.parametrize("h1,h2", SIZES)
def test_infinite_gradients_act_as_the_largest_finite_gradient(pre, param, h1, h2):
    # +inf gives exactly the update and new state of +FLT_MAX, -inf those of -FLT_MAX: the sign is kept.
    rng = np.random.default_rng([7, h1, len(pre)])
    phi, grad, state = _infinite_inputs(rng, 300, h1, h2, pre)
    update, new_state = K.forward_cpu(phi, grad, state, 0.1, h1, h2, pre, param)
    assert np.isfinite(update).all() and np.isfinite(new_state).all()
    for a, b in INF_PAIRS:
        assert update[a] == update[b], (a, update[a], update[b])
        np.testing.assert_array_equal(new_state[:, a], new_state[:, b])
    assert update[0] != update[1]  # +inf and -inf differ
    ref_u, ref_s = lstm_step_np(phi, grad, state, 0.1, h1, h2, pre, param)
    np.testing.assert_allclose(update, ref_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state, ref_s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pre,param", MODES)
def test_backward_at_infinite_gradients(pre, param):
    # d_grad at ±inf is 0 (the clamp of ±inf to ±FLT_MAX is flat there); d_state and the coordinate's share of
    # d_phi are those of ±FLT_MAX; everything finite.
    rng = np.random.default_rng([8, len(pre)])
    n = 300
    phi, grad, state = _infinite_inputs(rng, n, 7, 5, pre)
    du = rng.standard_normal(n).astype(np.float32)
    dns = rng.standard_normal(state.shape).astype(np.float32)
    for a, b in INF_PAIRS:
        du[a] = du[b]
        dns[:, a] = dns[:, b]
    d_phi, d_grad, d_state = K.backward_cpu(phi, grad, state, 0.3, du, dns, 7, 5, pre, param)
    for x in (d_phi, d_grad, d_state):
        assert np.isfinite(x).all()
    infinite = [a for a, _ in INF_PAIRS]
    assert (d_grad[infinite] == 0).all()
    clamped = np.clip(grad, -FLT_MAX, FLT_MAX)
    c_phi, c_grad, c_state = K.backward_cpu(phi, clamped, state, 0.3, du, dns, 7, 5, pre, param)
    np.testing.assert_array_equal(d_phi, c_phi)
    np.testing.assert_array_equal(d_state, c_state)
    np.testing.assert_array_equal(np.delete(d_grad, infinite), np.delete(c_grad, infinite))
    assert np.isfinite(c_grad).all()  # the derivative at ±FLT_MAX


def test_numpy_reference_treats_infinities_as_flt_max():
    g = np.array([np.inf, -np.inf, FLT_MAX, -FLT_MAX, np.nan], np.float32)
    for pre, param in MODES:
        x = preprocess_np(g, pre, param)
        np.testing.assert_array_equal(x[:, :2], x[:, 2:4])
        assert np.isfinite(x[:, :4]).all() and np.isnan(x[:, 4]).any()


@pytest.mark.parametrize("pre", ["paper", "clamped"])
@pytest.mark.parametrize("param", [1e-3, 80.0])
def test_preprocess_param_range_ends(pre, param):
    # The ends of the accepted range (0.001 <= p <= 80): every output finite, equal to the float64 reference.
    rng = np.random.default_rng(12)
    phi, grad, state = _inputs(rng, 300, 7, 5, pre, kink_params=(10.0, 5.0, param))
    update, new_state = K.forward_cpu(phi, grad, state, 0.1, 7, 5, pre, param)
    assert np.isfinite(update).all() and np.isfinite(new_state).all()
    ref_u, ref_s = lstm_step_np(phi, grad, state, 0.1, 7, 5, pre, param)
    np.testing.assert_allclose(update, ref_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state, ref_s, rtol=1e-5, atol=1e-6)
    du = rng.standard_normal(300).astype(np.float32)
    for x in K.backward_cpu(phi, grad, state, 0.1, du, None, 7, 5, pre, param):
        assert np.isfinite(x).all()


def _loss64(phi, grad, state, scale, d_update, d_new_state, h1, h2, pre, param):
    u, s = lstm_step_np(phi, grad, state, scale, h1, h2, pre, param)
    return float(np.dot(u, d_update) + np.sum(s * d_new_state))


def _smooth_grads(rng, n, pre, param):
    """Gradients away from the preprocessing kinks, with both branches of 'paper' and 'clamped'."""
    mag = 10.0 ** rng.uniform(-2.5, 1.0, n)
    if pre == "paper":
        mag[::3] = np.exp(-param) * rng.uniform(0.05, 0.7, len(mag[::3]))  # small branch
    if pre == "clamped":
        kink = np.exp(-param)
        mag = np.where(np.abs(np.log(mag / kink)) < 0.3, mag * 3.0, mag)
        mag[::3] = kink * rng.uniform(0.05, 0.6, len(mag[::3]))
    return (rng.choice([-1.0, 1.0], n) * mag).astype(np.float32)


@pytest.mark.parametrize("pre,param", [("none", 10.0), ("paper", 4.0), ("clamped", 2.0)])
@pytest.mark.parametrize("h1,h2", SIZES)
def test_backward_matches_finite_differences(pre, param, h1, h2):
    rng = np.random.default_rng(7 + h1 + len(pre))
    n, scale = 320, 0.7  # one whole (aligned, streaming-store) chunk and a partial one
    phi = layout.flatten(random_phi_tree(rng, h1, h2, pre, std=0.4))
    grad = _smooth_grads(rng, n, pre, param)
    state = (rng.standard_normal((2 * (h1 + h2), n)) * 0.6).astype(np.float32)
    du = rng.standard_normal(n).astype(np.float32)
    dns = rng.standard_normal(state.shape).astype(np.float32)
    d_phi, d_grad, d_state = K.backward_cpu(phi, grad, state, scale, du, dns, h1, h2, pre, param)
    assert d_phi.shape == phi.shape and d_grad.shape == grad.shape and d_state.shape == state.shape
    args = {"phi": phi.astype(np.float64), "grad": grad.astype(np.float64), "state": state.astype(np.float64)}
    got = {"phi": d_phi, "grad": d_grad, "state": d_state}
    for name in ("phi", "grad", "state"):
        flat = args[name].reshape(-1)
        picks = rng.choice(flat.size, 10, replace=False)
        if name == "phi":  # always include the output layer, the first input weight and one entry of each leaf
            where = layout.unflatten(np.arange(flat.size), h1, h2, layout.input_size(pre))  # flat index per entry
            named = [where["out"]["b"][0], where["out"]["w"][-1], where["lstm1"]["w"][0, 0]]
            named += [rng.choice(where[layer][part].reshape(-1)) for layer, part in layout.LEAVES]
            picks = np.concatenate([picks, named])
        for idx in picks:
            old = flat[idx]
            eps = 1e-6 * max(1.0, abs(old))
            flat[idx] = old + eps
            plus = _loss64(args["phi"], args["grad"], args["state"], scale, du, dns, h1, h2, pre, param)
            flat[idx] = old - eps
            minus = _loss64(args["phi"], args["grad"], args["state"], scale, du, dns, h1, h2, pre, param)
            flat[idx] = old
            fd = (plus - minus) / (2 * eps)
            value = got[name].reshape(-1)[idx]
            tol = 2e-3 * abs(fd) + 2e-5 * np.abs(got[name]).max() + 1e-6
            assert abs(value - fd) <= tol, (name, idx, value, fd)


def test_backward_none_upstream_state_gradient_is_zero_gradient():
    rng = np.random.default_rng(11)
    phi, grad, state = _inputs(rng, 500, 7, 5, "clamped")
    du = rng.standard_normal(500).astype(np.float32)
    a = K.backward_cpu(phi, grad, state, 0.3, du, None, 7, 5, "clamped", 5.0)
    b = K.backward_cpu(phi, grad, state, 0.3, du, np.zeros_like(state), 7, 5, "clamped", 5.0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_thread_count_independence():
    rng = np.random.default_rng(5)
    n = 256 * 9 + 64  # aligned rows and a partial last chunk
    phi, grad, state = _inputs(rng, n, 20, 20, "paper")
    du = rng.standard_normal(n).astype(np.float32)
    dns = rng.standard_normal(state.shape).astype(np.float32)
    base_f = K.forward_cpu(phi, grad, state, 0.1, preprocess="paper", num_threads=1)
    base_b = K.backward_cpu(phi, grad, state, 0.1, du, dns, preprocess="paper", num_threads=1)
    for threads in (2, 3, 7, 0):
        f = K.forward_cpu(phi, grad, state, 0.1, preprocess="paper", num_threads=threads)
        b = K.backward_cpu(phi, grad, state, 0.1, du, dns, preprocess="paper", num_threads=threads)
        for x, y in zip(f, base_f):
            np.testing.assert_array_equal(x, y)  # per-coordinate outputs: bitwise
        np.testing.assert_array_equal(b[1], base_b[1])
        np.testing.assert_array_equal(b[2], base_b[2])
        np.testing.assert_allclose(b[0], base_b[0], rtol=1e-4, atol=1e-4 * np.abs(base_b[0]).max())
        b2 = K.backward_cpu(phi, grad, state, 0.1, du, dns, preprocess="paper", num_threads=threads)
        np.testing.assert_array_equal(b2[0], b[0])  # deterministic for a fixed thread count


def test_bad_inputs_raise_value_error():
    rng = np.random.default_rng(6)
    phi, grad, state = _inputs(rng, 10, 7, 5, "none")
    with pytest.raises(ValueError, match="float32"):
        K.forward_cpu(phi, grad.astype(np.float64), state, 1.0, 7, 5)
    with pytest.raises(ValueError, match="phi"):
        K.forward_cpu(phi[:-1], grad, state, 1.0, 7, 5)
    with pytest.raises(ValueError, match="state"):
        K.forward_cpu(phi, grad, state[:-1], 1.0, 7, 5)
    with pytest.raises(ValueError, match="state"):
        K.forward_cpu(phi, grad[:-1], state, 1.0, 7, 5)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.forward_cpu(phi, grad, np.asfortranarray(state), 1.0, 7, 5)
    with pytest.raises(ValueError, match="preprocess"):
        K.forward_cpu(phi, grad, state, 1.0, 7, 5, "bogus")
    with pytest.raises(ValueError, match="preprocess_param"):
        K.forward_cpu(phi, grad, state, 1.0, 7, 5, "paper", -1.0)
    for pre in ("paper", "clamped"):  # e^p must stay a normal float32 number: 0.001 <= p <= 80
        for bad in (100.0, 80.5, 1e-4, 0.0, float("inf")):
            with pytest.raises(ValueError, match=r"preprocess_param must be in \[0.001, 80\]"):
                K.forward_cpu(phi, grad, state, 1.0, 7, 5, pre, bad)
    with pytest.raises(ValueError, match="scale"):
        K.forward_cpu(phi, grad, state, float("nan"), 7, 5)
    with pytest.raises(ValueError, match="hidden1"):
        K.forward_cpu(phi, grad, state, 1.0, 0, 5)
    with pytest.raises(ValueError, match="d_update"):
        K.backward_cpu(phi, grad, state, 1.0, grad[:-1], None, 7, 5)
    with pytest.raises(ValueError, match="d_new_state"):
        K.backward_cpu(phi, grad, state, 1.0, grad, state[:, :-1], 7, 5)


def test_preprocessing_reference_sanity():
    # The NumPy reference's features for the special gradients are finite where they should be.
    g = extreme_gradients(np.random.default_rng(0), 32)
    assert len(g) == 32 and g.dtype == np.float32
    for pre, param in MODES[1:]:
        x = preprocess_np(g, pre, param)
        assert np.isfinite(x).all()


def test_extreme_gradients_fixture():
    # The shared fixture begins with the special values, in float32 (subnormals are not flushed by the cast), then
    # straddles each kink; the rest are random magnitudes with both signs.
    rng = np.random.default_rng(1)
    g = extreme_gradients(rng, 400)
    assert g.dtype == np.float32 and g.shape == (400,)
    assert g[0] == 0 and np.signbit(g[1]) and g[1] == 0
    tiny = np.finfo(np.float32).tiny
    subnormal = g[(g != 0) & (np.abs(g) < tiny)]
    assert len(subnormal) >= 3 and np.float32(1.4e-45) in subnormal
    assert np.isfinite(g).all() and np.abs(g).max() >= 3e38
    for p in (10.0, 5.0):
        a = np.abs(g.astype(np.float64))
        assert ((a > np.exp(-p)) & (a < np.exp(-p) * 1.01)).sum() >= 2
        assert ((a < np.exp(-p)) & (a > np.exp(-p) * 0.99)).sum() >= 2
    assert (g[40:] > 0).any() and (g[40:] < 0).any()
    assert len(extreme_gradients(rng, 5)) == 5 and len(extreme_gradients(rng, 0)) == 0
