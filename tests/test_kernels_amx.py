"""The opt-in AMX-BF16 forward kernel (forward_cpu(..., isa="amx")) against the portable kernel and the float64
NumPy reference.

Skips when the extension is not built or when this CPU / OS cannot run AMX (or L2L_TF_DISABLE_AMX is set).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from lstm_step_numpy import lstm_step_np as _lstm_step_np
from lstm_step_numpy import num_params

try:
    from l2l_tf import _kernels as K
except ImportError as e:  # not built
    pytest.skip(f"l2l_tf._kernels is not built ({e})", allow_module_level=True)

if not K.amx_available():
    pytest.skip("this CPU / OS / build cannot run the AMX-BF16 kernel (needs AMX-TILE, AMX-BF16, AVX512-BF16 and "
                "the Linux tile permission), or L2L_TF_DISABLE_AMX is set", allow_module_level=True)

MODES = [("none", 10.0), ("paper", 10.0), ("clamped", 5.0)]
NS = [1, 15, 16, 17, 255, 256, 257, 4099, 15910]
# Tolerances: AMX vs portable (the brief's "1e-5 relative or 2e-6 absolute"), both vs the float64 reference as in
# test_kernels_cpu.py.
CMP = dict(rtol=1e-5, atol=2e-6)
REF = dict(rtol=1e-5, atol=1e-6)


def lstm_step_np(*args):
    with np.errstate(over="ignore"):  # exp overflow in the float64 sigmoid of huge gates: exact limits
        return _lstm_step_np(*args)


def _grads(rng, n):
    """Gradients of every kind: zeros, tiny (subnormal), huge, both signs, random magnitudes."""
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-42, 1.4e-45, 1e30, -1e30, 3e38, -3e38, 1.0, -1.0,
                        np.exp(-10.0) * 1.001, -np.exp(-10.0) * 0.999, np.exp(-5.0) * 1.01, -np.exp(-5.0) * 0.99],
                       np.float32)
    rand = (rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-12, 4, n)).astype(np.float32)
    k = min(n, len(special))
    rand[:k] = special[:k]
    return rand


def _inputs(rng, n, h1, h2, pre):
    phi = (rng.standard_normal(num_params(h1, h2, pre)) * 0.4).astype(np.float32)
    grad = _grads(rng, n)
    state = (rng.standard_normal((2 * (h1 + h2), n)) * 0.6).astype(np.float32)
    return phi, grad, state


def _both(phi, grad, state, h1, h2, pre, param, scale=0.1, threads=1):
    fast = K.forward_cpu(phi, grad, state, scale, h1, h2, pre, param, num_threads=threads, isa="amx")
    port = K.forward_cpu(phi, grad, state, scale, h1, h2, pre, param, num_threads=threads, isa="portable")
    return fast, port


def test_supported_sizes():
    assert K.amx_supported(20, 20, "paper")
    assert K.amx_supported(20, 20, "none")
    assert K.amx_supported(7, 5, "clamped")
    assert not K.amx_supported(40, 20, "paper")  # hidden1 + hidden2 = 60 > 42
    assert not K.amx_supported(21, 20, "paper")  # 4 * 21 gate rows > 80


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("pre,param", MODES)
@pytest.mark.parametrize("h1,h2", [(20, 20), (7, 5)])
def test_amx_matches_portable_and_numpy(pre, param, h1, h2, n):
    rng = np.random.default_rng([len(pre), h1, h2, n])
    phi, grad, state = _inputs(rng, n, h1, h2, pre)
    (u_f, s_f), (u_p, s_p) = _both(phi, grad, state, h1, h2, pre, param)
    assert u_f.shape == (n,) and s_f.shape == state.shape and u_f.dtype == np.float32
    np.testing.assert_allclose(u_f, u_p, **CMP)
    np.testing.assert_allclose(s_f, s_p, **CMP)
    ref_u, ref_s = lstm_step_np(phi, grad, state, 0.1, h1, h2, pre, param)
    np.testing.assert_allclose(u_f, ref_u, **REF)
    np.testing.assert_allclose(s_f, ref_s, **REF)
    np.testing.assert_allclose(u_p, ref_u, **REF)
    np.testing.assert_allclose(s_p, ref_s, **REF)


@pytest.mark.parametrize("n", [17, 4099])
@pytest.mark.parametrize("h1,h2", [(40, 20), (21, 20), (3, 40)])
def test_unsupported_sizes_fall_back_to_portable(h1, h2, n):
    rng = np.random.default_rng([h1, h2, n])
    phi, grad, state = _inputs(rng, n, h1, h2, "paper")
    (u_f, s_f), (u_p, s_p) = _both(phi, grad, state, h1, h2, "paper", 10.0)
    np.testing.assert_array_equal(u_f, u_p)  # the same kernel ran
    np.testing.assert_array_equal(s_f, s_p)


@pytest.mark.parametrize("pre,param", MODES)
def test_realistic_state_and_threads(pre, param):
    # The paper's MNIST size; state produced by a few steps (|h| < 1), small gradients; 2 threads (ranges of
    # whole 256-coordinate chunks), unaligned rows (N % 16 = 6).
    n = 15910
    rng = np.random.default_rng(7)
    phi = (rng.standard_normal(num_params(20, 20, pre)) * 0.2).astype(np.float32)
    state = np.zeros((80, n), np.float32)
    for _ in range(3):
        grad = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        _, state = K.forward_cpu(phi, grad, state, 0.01, 20, 20, pre, param, isa="portable")
    grad = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    (u_f, s_f), (u_p, s_p) = _both(phi, grad, state, 20, 20, pre, param, scale=0.01, threads=2)
    np.testing.assert_allclose(u_f, u_p, **CMP)
    np.testing.assert_allclose(s_f, s_p, **CMP)


@pytest.mark.parametrize("pre,param", MODES)
@pytest.mark.parametrize("n", [16, 50, 1024])
def test_non_finite_inputs_like_portable(pre, param, n):
    """NaN / inf gradients and states: the AMX kernel must give what the portable kernel gives."""
    rng = np.random.default_rng([len(pre), n, 3])
    phi, grad, state = _inputs(rng, n, 20, 20, pre)
    grad[1] = np.nan
    grad[min(5, n - 1)] = np.inf
    grad[min(9, n - 1)] = -np.inf
    grad[n - 1] = np.float32(3.4e38)           # rounds to inf in bf16 when rounded to nearest
    state[3, min(20, n - 1)] = np.nan          # h1
    state[45, min(33, n - 1)] = np.inf         # h2
    state[25, min(12, n - 1)] = np.inf         # c1
    state[70, min(40, n - 1)] = -np.inf        # c2
    state[22, min(47, n - 1)] = np.nan         # c1
    with np.errstate(invalid="ignore"):
        (u_f, s_f), (u_p, s_p) = _both(phi, grad, state, 20, 20, pre, param)
    # NaN where the portable kernel has NaN, the same infinities, close elsewhere.
    np.testing.assert_array_equal(np.isnan(u_f), np.isnan(u_p))
    np.testing.assert_array_equal(np.isnan(s_f), np.isnan(s_p))
    np.testing.assert_array_equal(np.isinf(s_f), np.isinf(s_p))
    np.testing.assert_allclose(u_f, u_p, **CMP)
    np.testing.assert_allclose(s_f, s_p, **CMP)


def test_in_place_aliasing_free_outputs_and_scale():
    # Outputs are new arrays; inputs are not modified.
    n = 777
    rng = np.random.default_rng(11)
    phi, grad, state = _inputs(rng, n, 20, 20, "paper")
    g0, s0 = grad.copy(), state.copy()
    (u_f, s_f), (u_p, s_p) = _both(phi, grad, state, 20, 20, "paper", 10.0, scale=-3.5)
    np.testing.assert_array_equal(grad, g0)
    np.testing.assert_array_equal(state, s0)
    np.testing.assert_allclose(u_f, u_p, rtol=1e-5, atol=2e-6 * 35)
    np.testing.assert_allclose(s_f, s_p, **CMP)


def test_auto_is_portable_and_bad_isa():
    n = 300
    rng = np.random.default_rng(5)
    phi, grad, state = _inputs(rng, n, 20, 20, "paper")
    a = K.forward_cpu(phi, grad, state, 0.1, 20, 20, "paper")
    p = K.forward_cpu(phi, grad, state, 0.1, 20, 20, "paper", isa="portable")
    np.testing.assert_array_equal(a[0], p[0])
    np.testing.assert_array_equal(a[1], p[1])
    with pytest.raises(ValueError, match="isa"):
        K.forward_cpu(phi, grad, state, 0.1, 20, 20, "paper", isa="avx9000")


def test_non_finite_phi_falls_back():
    n = 64
    rng = np.random.default_rng(9)
    phi, grad, state = _inputs(rng, n, 20, 20, "paper")
    phi[5] = np.inf
    with np.errstate(invalid="ignore"):
        (u_f, s_f), (u_p, s_p) = _both(phi, grad, state, 20, 20, "paper", 10.0)
    np.testing.assert_array_equal(u_f, u_p)
    np.testing.assert_array_equal(s_f, s_p)


def test_env_disables_amx():
    code = (
        "import numpy as np\n"
        "from l2l_tf import _kernels as K\n"
        "assert not K.amx_available() and not K.amx_supported(20, 20, 'paper')\n"
        "rng = np.random.default_rng(0)\n"
        "phi = (rng.standard_normal(K.num_params(20, 20, 'paper')) * 0.4).astype(np.float32)\n"
        "g = rng.standard_normal(100).astype(np.float32); s = rng.standard_normal((80, 100)).astype(np.float32)\n"
        "a = K.forward_cpu(phi, g, s, 0.1, 20, 20, 'paper', isa='amx')\n"
        "p = K.forward_cpu(phi, g, s, 0.1, 20, 20, 'paper', isa='portable')\n"
        "assert (a[0] == p[0]).all() and (a[1] == p[1]).all()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, L2L_TF_DISABLE_AMX="1", TF_CPP_MIN_LOG_LEVEL="3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
