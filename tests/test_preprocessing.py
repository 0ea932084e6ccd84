import math

import numpy as np
import pytest
import tensorflow as tf

from l2l_tf.ops import StepConfig
from l2l_tf.ops.reference import preprocess
from l2l_tf.rules.preprocess import DEFAULT_PARAM, MODES, Preprocessing

F32 = np.finfo(np.float32)


def features(values, mode, param=None):
    return Preprocessing(mode, param).features(tf.constant(values, tf.float32)).numpy()


def test_paper_form_hand_values():
    # p = 10: threshold e^-10 ≈ 4.54e-5.
    g = [1.0, -math.exp(-5.0), 1e-5, -1e-5, 0.0, 5e-5]
    x = features(g, "paper")
    expected_log = [0.0, -0.5, -1.0, -1.0, -1.0, math.log(5e-5) / 10]
    expected_sign = [1.0, -1.0, math.exp(10) * 1e-5, -math.exp(10) * 1e-5, 0.0, 1.0]
    np.testing.assert_allclose(x[0], expected_log, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(x[1], expected_sign, rtol=1e-6, atol=1e-7)


def test_paper_form_other_p():
    x = features([math.exp(-2.0), math.exp(-4.0)], "paper", 3.0)  # threshold e^-3
    np.testing.assert_allclose(x, [[-2.0 / 3, -1.0], [1.0, math.exp(3.0 - 4.0)]], rtol=1e-6)


def test_clamped_form_hand_values():
    eps = F32.eps
    g = [1.0, -1e-3, 0.1, 1e-30, 0.0, -2.0]
    x = features(g, "clamped")  # k = 5
    expected_log = [math.log(1 + eps) / 5, -1.0, math.log(0.1 + eps) / 5, -1.0, -1.0, math.log(2 + eps) / 5]
    expected_sign = [1.0, -1e-3 * math.exp(5), 1.0, 1e-30 * math.exp(5), 0.0, -1.0]
    np.testing.assert_allclose(x[0], expected_log, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(x[1], expected_sign, rtol=1e-5, atol=1e-37)


@pytest.mark.parametrize("mode", ["paper", "clamped", "none"])
def test_float32_extremes_stay_finite(mode):
    g = [F32.max, -F32.max, F32.tiny, -F32.tiny, float(F32.smallest_subnormal), 0.0, -0.0]
    x = features(g, mode)
    assert np.all(np.isfinite(x))
    if mode != "none":
        assert np.all(np.abs(x[1]) <= 1.0 + 1e-6)
        assert np.all(x[0] >= -1.0)


@pytest.mark.parametrize("mode", ["paper", "clamped"])
def test_gradient_of_preprocessing_is_finite_at_zero(mode):
    g = tf.constant([0.0, 1e-30, 1.0, -1.0])
    with tf.GradientTape() as tape:
        tape.watch(g)
        y = tf.reduce_sum(preprocess(g, StepConfig(preprocess=mode)))
    assert np.all(np.isfinite(tape.gradient(y, g).numpy()))


def test_bad_mode_and_param():
    with pytest.raises(ValueError, match="preprocess"):
        StepConfig(preprocess="log")
    with pytest.raises(ValueError, match="preprocess_param"):
        StepConfig(preprocess="paper", preprocess_param=-1.0)


def test_preprocessing_values_defaults_and_errors():
    assert MODES == ("none", "paper", "clamped")
    for mode in MODES:
        assert Preprocessing(mode).param == DEFAULT_PARAM[mode]
        assert Preprocessing(mode).num_features == (1 if mode == "none" else 2)
    assert Preprocessing("paper", 3).param == 3.0
    with pytest.raises(ValueError, match="preprocess must be one of"):
        Preprocessing("log")
    with pytest.raises(ValueError, match="preprocess_param"):
        Preprocessing("clamped", float("inf"))


def _features_and_gradient(values, mode, param=None, jit=False):
    """Features of `values` and d(sum of features)/d(values), eagerly or XLA-compiled."""
    config = StepConfig(preprocess=mode, preprocess_param=param)

    def run(g):
        with tf.GradientTape() as tape:
            tape.watch(g)
            x = preprocess(g, config)
            total = tf.reduce_sum(tf.where(tf.math.is_nan(x), 0.0, x))
        return x, tape.gradient(total, g)

    if jit:
        run = tf.function(run, jit_compile=True)
    x, d = run(tf.constant(values, tf.float32))
    return x.numpy(), d.numpy()


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("mode", ["none", "paper", "clamped"])
def test_infinite_gradients_give_the_features_of_flt_max(mode, jit):
    # ±inf act as ±FLT_MAX (the sign is kept); their derivative is 0 (the clamp is flat beyond ±FLT_MAX), finite.
    x, d = _features_and_gradient([np.inf, -np.inf, F32.max, -F32.max], mode, jit=jit)
    np.testing.assert_array_equal(x[:, :2], x[:, 2:])
    assert np.isfinite(x).all() and not np.array_equal(x[:, 0], x[:, 1])
    assert np.isfinite(d).all()
    np.testing.assert_array_equal(d[:2], [0.0, 0.0])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("mode", ["none", "paper", "clamped"])
def test_nan_gradient_gives_nan_features(mode, jit):
    x, _ = _features_and_gradient([np.nan, 1.0, -1e-3], mode, jit=jit)
    assert np.isnan(x[:, 0]).any() and np.isfinite(x[:, 1:]).all()


def test_finite_gradients_unchanged_by_the_infinity_clamp():
    # The clamp to [-FLT_MAX, FLT_MAX] leaves every finite float32 exactly as it is (bitwise features).
    g = np.array([F32.max, -F32.max, np.nextafter(F32.max, 0, dtype=np.float32), 1.0, -2.5e-7, 0.0, -0.0,
                  float(F32.smallest_subnormal)], np.float32)
    for mode in ("none", "paper", "clamped"):
        config = StepConfig(preprocess=mode)
        param = config.preprocess_param
        x = preprocess(tf.constant(g), config).numpy()
        if mode == "none":
            np.testing.assert_array_equal(x[0].view(np.uint32), g.view(np.uint32))
        else:
            a = tf.abs(tf.constant(g))
            if mode == "paper":
                big = a >= np.float32(math.exp(-param))
                log = tf.where(big, tf.math.log(tf.where(big, a, 1.0)) / param, -1.0)
            else:
                log = tf.maximum(tf.math.log(a + F32.eps) / param, -1.0)
            np.testing.assert_array_equal(x[0], log.numpy())


@pytest.mark.parametrize("mode", ["paper", "clamped"])
@pytest.mark.parametrize("param", [80.5, 100.0, 1e3, 1e-4, 0.0, -1.0, float("inf"), float("nan")])
def test_preprocess_param_out_of_range(mode, param):
    # e^p must be a normal float32 number and log|g|/p finite: 0.001 <= p <= 80 (e^88.7 overflows float32).
    with pytest.raises(ValueError, match=r"preprocess_param must be in \[0.001, 80\]"):
        StepConfig(preprocess=mode, preprocess_param=param)
    with pytest.raises(ValueError, match=r"preprocess_param must be in \[0.001, 80\]"):
        Preprocessing(mode, param)


@pytest.mark.parametrize("mode", ["paper", "clamped"])
@pytest.mark.parametrize("param", [1e-3, 80.0])
def test_preprocess_param_range_ends_give_finite_features(mode, param):
    g = [F32.max, -F32.max, np.inf, -np.inf, 1.0, F32.tiny, float(F32.smallest_subnormal), 0.0, math.exp(-param)]
    x, d = _features_and_gradient(g, mode, param)
    assert np.isfinite(x).all() and np.isfinite(d).all()
    # (at |g| = e^-p itself, log|g|/p is -1 up to float32 rounding, amplified by 1/p)
    assert np.all(x[0] >= -1.0 - 1e-4) and np.all(np.abs(x[1]) <= 1.0 + 1e-6)
