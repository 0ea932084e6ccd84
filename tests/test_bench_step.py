"""The benchmark modes of experiments/bench_step.py run and print their tables (tiny sizes: what is checked is the
report, not the speed; speed goals are read off the full runs in README)."""
import os
import re
import subprocess
import sys

import pytest

from l2l_tf import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "experiments", "bench_step.py")


def run(*args, timeout=600):
    result = subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _kernels():
    try:
        from l2l_tf import _kernels
    except ImportError as e:
        pytest.skip(f"l2l_tf._kernels is not built ({e})")
    return _kernels


def _cpu_model():
    """This machine's CPU model as /proc/cpuinfo names it (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def assert_names_the_machine(out):
    """Tables are only comparable on one CPU (the bfloat16 rows swap places between Zen 4 and Intel Xeons)."""
    model = _cpu_model()
    if model:
        assert f"{os.cpu_count()} CPUs, {model}" in out, out[:2000]


def test_phases_table_accounts_every_phase():
    _kernels()
    out = run("--benchmark=phases", "--sizes=2048", "--repeats=2")
    assert_names_the_machine(out)
    rows = {name: (f, b) for name, f, b in re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)}
    assert {"stage", "gates1", "cell1", "gates2", "cell2", "cell_backward2", "input_grad2", "cell_backward1",
            "input_grad1", "weight_grad", "finish", "total"} <= set(rows)
    total = re.search(r"^\| total \| ([\d.]+) \| ([\d.]+) \| floor ([\d.]+) \+ ([\d.]+): ([\d.]+)×", out, re.M)
    assert total, out
    forward, backward, floor_f, floor_b, ratio = map(float, total.groups())
    assert floor_b == pytest.approx(3 * floor_f, rel=1e-2) and forward > floor_f * 0.5
    assert ratio == pytest.approx((forward + backward) / (floor_f + floor_b), rel=1e-2)
    # The saving forward and the backward reading its activations: that backward runs no forward phase again.
    saved = {name: (float(f), float(b)) for name, f, b in
             re.findall(r"^\| (\w+) \| [\d.]+ \| [\d.]+ \| [^|]* \| ([\d.]+) \| ([\d.]+) \|", out, re.M)}
    assert {"gates1", "cell1", "gates2", "cell2", "weight_grad"} <= set(saved), out
    for name in ("gates1", "cell1", "gates2", "cell2"):
        assert saved[name][0] > 0 and saved[name][1] == 0.0, (name, saved[name])
    assert saved["weight_grad"][1] > 0


def test_meta_table_splits_a_run():
    _kernels()
    if not ops.fused_available():
        pytest.skip(f"fused op not built: {ops.fused_load_error()}")
    out = run("--benchmark=meta", "--meta_models=mnist", "--meta_runs=1", "--meta_num_steps=20",
              "--meta_implementations=fused,fused_recompute", "--repeats=1")
    assert_names_the_machine(out)
    for implementation in ("fused", "fused_recompute"):
        row = re.search(rf"^\| mnist \| 15,910 \| {implementation} \| ([\d.]+) \| (-?[\d.]+) \| ([\d.]+) \| "
                        r"(-?[\d.]+) \| ([\d.]+) \| ([\d.]+)× \|", out, re.M)
        assert row, out
        total, lstm, optimizee, rest, floor, ratio = map(float, row.groups())
        assert total == pytest.approx(lstm + optimizee + rest, abs=2e-3)
        assert floor > 0 and ratio == pytest.approx(total / floor, rel=2e-2)
    calls = re.findall(r"^\| mnist \| \[4\] \| (one call for all tensors|one call per tensor) \| ([\d.]+) \|", out, re.M)
    assert {mode for mode, _ in calls} == {"one call for all tensors", "one call per tensor"}


@pytest.mark.parametrize("upstream", ["loss", "inputs"])
def test_step_table_times_every_implementation_and_pass(upstream):
    if not ops.fused_available():
        pytest.skip(f"fused op not built: {ops.fused_load_error()}")
    out = run("--sizes=300", "--impls=tf_function,fused,fused_saved", "--passes=forward,forward_backward",
              f"--upstream={upstream}", "--repeats=1", "--warmup=1")
    assert_names_the_machine(out)
    rows = re.findall(r"^(\w+) +300 (forward|forward_backward) +([\d.]+) +[\d.]+ +([\d.]+)x", out, re.M)
    # fused_saved has no forward-only row (it differs from fused only in what the gradient reads).
    assert {(impl, pass_name) for impl, pass_name, _, _ in rows} == {
        ("tf_function", "forward"), ("fused", "forward"), ("tf_function", "forward_backward"),
        ("fused", "forward_backward"), ("fused_saved", "forward_backward")}, out
    for impl, pass_name, ms, ratio in rows:
        best_tf = float(next(m for i, p, m, _ in rows if i == "tf_function" and p == pass_name))
        assert float(ratio) == pytest.approx(best_tf / float(ms), rel=0.02, abs=0.01), (impl, pass_name, out)


def test_upstream_inputs_are_the_vjp_upstream_gradients():
    """--upstream=inputs: forward_backward's d_phi is the gradient of sum(update * d_update) + sum(new_state *
    d_new_state), the VJP with those upstream gradients (checked against one written out with a loss)."""
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, ROOT)
    from experiments import bench_step

    cfg = ops.StepConfig(5, 4, "paper")
    rng = np.random.default_rng(3)
    phi = ops.phi_tree((rng.standard_normal(cfg.num_params) * 0.3).astype(np.float32), cfg)
    grad = tf.constant(rng.standard_normal(37).astype(np.float32))
    state = tf.constant((rng.standard_normal((cfg.state_rows, 37)) * 0.5).astype(np.float32))
    d_update = tf.constant(rng.standard_normal(37).astype(np.float32))
    d_new_state = tf.constant(rng.standard_normal((cfg.state_rows, 37)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(tf.nest.flatten(phi))
        update, new_state = ops.lstm_step(phi, grad, state, 0.1, cfg, "reference")
        loss = tf.reduce_sum(update * d_update) + tf.reduce_sum(new_state * d_new_state)
    expected = tf.nest.flatten(tape.gradient(loss, phi))
    impls = ["tf_function"] + (["fused_saved"] if ops.fused_available() else [])
    for impl in impls:
        fn = bench_step.make_pass(impl, "forward_backward", cfg)
        d_phi = tf.nest.flatten(fn(phi, grad, state, tf.constant(0.1), d_update, d_new_state)[0])
        for got, want in zip(d_phi, expected):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5, err_msg=impl)
        # Without them, the default loss: a different gradient.
        default = tf.nest.flatten(fn(phi, grad, state, tf.constant(0.1))[0])
        assert max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(default, expected)) > 1e-3, impl
