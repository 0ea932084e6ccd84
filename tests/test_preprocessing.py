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
