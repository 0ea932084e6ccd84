"""The fused TensorFlow op (csrc/tf_op.cc via l2l_tf.ops.fused) against the pure-TF reference, and the switch.

Tests of the op itself skip (with the reason) when the op library is not built; the switch tests always run.
"""
import numpy as np
import pytest
import tensorflow as tf

import l2l_tf.ops as ops
from l2l_tf.ops import StepConfig, fused, reference
from lstm_step_numpy import DEFAULT_KINK_PARAMS, extreme_gradients


def _need_op():
    if not fused.available():
        pytest.skip(f"fused op not built: {fused.load_error()}")
    return fused._load()


def _inputs(rng, cfg, n, grads=None):
    """(flat φ [P] as the kernels read it, grad [N], state [S, N]); `tree(phi, cfg)` is the same φ as a tree."""
    phi = tf.constant((rng.standard_normal(cfg.num_params) * 0.4).astype(np.float32))
    kinks = DEFAULT_KINK_PARAMS + (cfg.preprocess_param,)
    grad = tf.constant(extreme_gradients(rng, n, kinks) if grads is None else grads)
    state = tf.constant((rng.standard_normal((cfg.state_rows, n)) * 0.6).astype(np.float32))
    return phi, grad, state


def tree(phi, cfg):
    return ops.phi_tree(phi, cfg)


def reference_flat(phi, grad, state, scale, cfg):
    """The pure-TF step on a flat φ (split into the tree differentiably), to compare with the op on equal inputs."""
    return reference.lstm_step(tree(phi, cfg), grad, state, scale, cfg)


CONFIGS = [StepConfig(20, 20, "none"), StepConfig(20, 20, "paper"), StepConfig(20, 20, "clamped"),
           StepConfig(7, 5, "paper", 3.0), StepConfig(7, 5, "clamped", 2.0), StepConfig(7, 5, "none")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.hidden1}-{c.hidden2}-{c.preprocess}")
def test_forward_matches_reference(cfg):
    _need_op()
    rng = np.random.default_rng([cfg.hidden1, len(cfg.preprocess)])
    # 1536: 64-byte aligned rows (the kernels' streaming stores); 1000: unaligned rows and a partial chunk.
    phi, grad, state = _inputs(rng, cfg, 1536 if cfg.hidden1 == 20 else 1000)
    u, s = fused.lstm_step(phi, grad, state, 0.1, cfg)
    ru, rs = reference_flat(phi, grad, state, 0.1, cfg)
    np.testing.assert_allclose(u.numpy(), ru.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.numpy(), rs.numpy(), rtol=1e-5, atol=1e-6)
    # Through the switch (φ as a tree), eagerly and in a tf.function.
    u2, s2 = ops.lstm_step(tree(phi, cfg), grad, state, 0.1, cfg, implementation="fused")
    np.testing.assert_array_equal(u2.numpy(), u.numpy())
    u3, s3 = tf.function(lambda p, g, st: ops.lstm_step(p, g, st, 0.1, cfg))(tree(phi, cfg), grad, state)
    np.testing.assert_array_equal(s3.numpy(), s.numpy())


def test_multi_step_in_graph_matches_reference():
    # Chained steps inside a tf.function (where TF may update the state buffer in place).
    _need_op()
    cfg = StepConfig(20, 20, "paper")
    rng = np.random.default_rng(1)
    phi, grad, state = _inputs(rng, cfg, 3072)

    def run(impl):
        @tf.function
        def f(p, g, st):
            total = tf.zeros_like(g)
            for k in range(3):
                # Fresh gradients each step (feeding u back into g could cancel to ~0 and amplify rounding).
                u, st = ops.lstm_step(tree(p, cfg), g * (1.0 + 0.5 * k), st, 0.1, cfg, implementation=impl)
                total += u
            return total, st
        return f(phi, grad, state)

    a, b = run("fused"), run("reference")
    np.testing.assert_allclose(a[0].numpy(), b[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[1].numpy(), b[1].numpy(), rtol=1e-4, atol=1e-5)


def _smooth_grads(rng, n):
    # Away from the preprocessing kinks (paper: e^-p; clamped: e^-k), both branches.
    g = (rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-1.5, 0.5, n)).astype(np.float32)
    g[::4] *= 1e-4
    return g


@pytest.mark.parametrize("cfg", [StepConfig(3, 2, "paper", 5.0), StepConfig(3, 2, "clamped", 3.0),
                                 StepConfig(3, 2, "none")], ids=lambda c: c.preprocess)
def test_compute_gradient(cfg):
    _need_op()
    rng = np.random.default_rng(2)
    n = 6
    phi, _, state = _inputs(rng, cfg, n)
    grad = tf.constant(_smooth_grads(rng, n))
    w_u = tf.constant(rng.standard_normal(n).astype(np.float32))
    w_s = tf.constant(rng.standard_normal((cfg.state_rows, n)).astype(np.float32))

    def make(impl):
        def f(p, g, st):
            u, s = impl(p, g, st, 0.7, cfg)
            return tf.concat([u * w_u, tf.reshape(s * w_s, [-1])], 0)
        return f

    args = [phi, grad, state]
    theo, num = tf.test.compute_gradient(make(fused.lstm_step), args, delta=1e-3)
    ref_theo, _ = tf.test.compute_gradient(make(reference_flat), args, delta=1e-3)
    for t, nm, rt in zip(theo, num, ref_theo):
        scale = max(1.0, np.abs(t).max())
        assert np.abs(t - nm).max() <= 2e-2 * scale  # float32 central differences
        np.testing.assert_allclose(t, rt, rtol=1e-4, atol=1e-5 * scale)  # analytic: fused vs reference


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
@pytest.mark.parametrize("stop_gradient", [True, False])
def test_unrolled_meta_gradient_matches_reference(stop_gradient, graph):
    # In a tf.function TF may hand an op's input buffer to its output; the values the backward needs must survive.
    _need_op()
    cfg = StepConfig(20, 20, "paper")
    rng = np.random.default_rng(3)
    n = 320
    a = tf.constant(rng.uniform(0.5, 2.0, n).astype(np.float32))
    b = tf.constant(rng.standard_normal(n).astype(np.float32))
    theta0 = tf.constant(rng.standard_normal(n).astype(np.float32))
    phi = tf.Variable((rng.standard_normal(cfg.num_params) * 0.2).astype(np.float32))

    def meta_grad(impl):
        with tf.GradientTape() as tape:
            theta = theta0
            state = tf.zeros((cfg.state_rows, n))
            loss = 0.0
            for _ in range(5):
                with tf.GradientTape() as inner:
                    inner.watch(theta)
                    f = tf.reduce_sum(a * (theta - b) ** 2)
                g = inner.gradient(f, theta)
                if stop_gradient:
                    g = tf.stop_gradient(g)
                update, state = ops.lstm_step(tree(phi, cfg), g, state, 0.1, cfg, implementation=impl)
                theta = theta + update
                loss += tf.reduce_sum(a * (theta - b) ** 2)
        return loss, tape.gradient(loss, phi)

    run = (lambda impl: tf.function(lambda: meta_grad(impl))()) if graph else meta_grad
    loss_f, grad_f = run("fused")
    loss_r, grad_r = run("reference")
    np.testing.assert_allclose(loss_f.numpy(), loss_r.numpy(), rtol=1e-5)
    np.testing.assert_allclose(grad_f.numpy(), grad_r.numpy(), rtol=1e-3, atol=1e-4 * np.abs(grad_r).max())


def test_gradient_through_new_state_only():
    _need_op()
    cfg = StepConfig(7, 5, "clamped")
    rng = np.random.default_rng(4)
    phi, grad, state = _inputs(rng, cfg, 100, grads=_smooth_grads(rng, 100))

    def g(impl):
        with tf.GradientTape() as tape:
            tape.watch([phi, state])
            _, s = impl(phi, grad, state, 1.0, cfg)
            loss = tf.reduce_sum(s ** 2)
        return tape.gradient(loss, [phi, state])

    for x, y in zip(g(fused.lstm_step), g(reference_flat)):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-4, atol=1e-5 * np.abs(y.numpy()).max())


def test_invalid_arguments_raise_invalid_argument_error():
    module = _need_op()
    cfg = StepConfig(7, 5, "paper")
    rng = np.random.default_rng(5)
    phi, grad, state = _inputs(rng, cfg, 20)
    attrs = dict(hidden1=7, hidden2=5, preprocess="paper", preprocess_param=10.0)
    one = tf.constant(1.0)
    bad_calls = [
        lambda: module.l2l_lstm_step(phi[:-1], grad, state, one, **attrs),           # wrong P
        lambda: module.l2l_lstm_step(phi[None], grad, state, one, **attrs),          # phi rank
        lambda: module.l2l_lstm_step(phi, grad[:-1], state, one, **attrs),           # N mismatch
        lambda: module.l2l_lstm_step(phi, grad[None], state, one, **attrs),          # grad rank
        lambda: module.l2l_lstm_step(phi, grad, state[:-1], one, **attrs),           # wrong S
        lambda: module.l2l_lstm_step(phi, grad, state[0], one, **attrs),             # state rank
        lambda: module.l2l_lstm_step(phi, grad, state, tf.constant([1.0]), **attrs),  # scale not scalar
        lambda: module.l2l_lstm_step(phi, grad, state, tf.constant(np.inf, tf.float32), **attrs),
        lambda: module.l2l_lstm_step(phi, grad, state, tf.constant(np.nan, tf.float32), **attrs),
        lambda: module.l2l_lstm_step(phi, grad, state, one, **{**attrs, "preprocess": "bogus"}),
        lambda: module.l2l_lstm_step(phi, grad, state, one, **{**attrs, "hidden1": 0}),
        lambda: module.l2l_lstm_step(phi, grad, state, one, **{**attrs, "hidden2": -3}),
        lambda: module.l2l_lstm_step(phi, grad, state, one, **{**attrs, "preprocess_param": -1.0}),
        lambda: module.l2l_lstm_step(phi, grad, state, one, **{**attrs, "preprocess_param": float("nan")}),
        lambda: module.l2l_lstm_step_grad(phi, grad, state, one, grad[:-1], state, **attrs),
        lambda: module.l2l_lstm_step_grad(phi, grad, state, one, grad, state[:, :-1], **attrs),
        lambda: module.l2l_lstm_step_grad(phi, grad, state, tf.constant(np.inf, tf.float32), grad, state, **attrs),
    ]
    for i, call in enumerate(bad_calls):
        with pytest.raises(tf.errors.InvalidArgumentError):
            call()
            pytest.fail(f"bad call {i} did not raise")
    # Shapes unknown at graph construction: the kernel's run-time checks.
    f = tf.function(lambda p, g, s: module.l2l_lstm_step(p, g, s, one, **attrs),
                    input_signature=[tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.float32),
                                     tf.TensorSpec([None, None], tf.float32)])
    for args in [(phi[:-1], grad, state), (phi, grad[:-1], state), (phi, grad, state[:-1])]:
        with pytest.raises(tf.errors.InvalidArgumentError):
            f(*args)
    f(phi, grad, state)  # and the good call works


def test_python_wrapper_type_and_shape_errors():
    _need_op()
    cfg = StepConfig(7, 5, "paper")
    rng = np.random.default_rng(6)
    phi, grad, state = _inputs(rng, cfg, 20)
    with pytest.raises(TypeError, match="grad must be float32, got float64"):
        fused.lstm_step(phi, tf.cast(grad, tf.float64), state, 1.0, cfg)
    with pytest.raises(TypeError, match="state must be float32"):
        fused.lstm_step(phi, grad, state.numpy().astype(np.float64), 1.0, cfg)
    with pytest.raises(ValueError, match="phi must have"):
        fused.lstm_step(phi[:-1], grad, state, 1.0, cfg)
    with pytest.raises(ValueError, match="rows"):
        fused.lstm_step(phi, grad, state[:-1], 1.0, cfg)
    with pytest.raises(ValueError, match="disagree"):
        fused.lstm_step(phi, grad[:-1], state, 1.0, cfg)
    with pytest.raises(ValueError, match="rank"):
        fused.lstm_step(phi, grad[None], state, 1.0, cfg)
    with pytest.raises(ValueError, match="finite"):
        fused.lstm_step(phi, grad, state, float("inf"), cfg)


def test_fused_unavailable_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(fused, "available", lambda: False)
    monkeypatch.setattr(fused, "load_error", lambda: "simulated: not built")
    with pytest.raises(RuntimeError, match="simulated: not built"):
        ops.check_implementation("fused")
    cfg = StepConfig(7, 5, "paper")
    rng = np.random.default_rng(7)
    phi, grad, state = _inputs(rng, cfg, 10)
    with pytest.raises(RuntimeError):
        ops.lstm_step(tree(phi, cfg), grad, state, 1.0, cfg, implementation="fused")
    assert ops.resolve_implementation("auto") == "reference"
    u, _ = ops.lstm_step(tree(phi, cfg), grad, state, 1.0, cfg, implementation="auto")
    np.testing.assert_array_equal(u.numpy(), reference_flat(phi, grad, state, 1.0, cfg)[0].numpy())


def test_inside_xla_compilation_detection():
    seen = {}

    @tf.function(jit_compile=True)
    def jit(x):
        seen["jit"] = fused.inside_xla_compilation()

        @tf.function
        def inner(y):
            seen["nested"] = fused.inside_xla_compilation()
            return y * 2
        return inner(x)

    @tf.function
    def plain(x):
        seen["plain"] = fused.inside_xla_compilation()
        return x + 1

    jit(tf.constant(1.0))
    plain(tf.constant(1.0))
    seen["eager"] = fused.inside_xla_compilation()
    assert seen == {"jit": True, "nested": True, "plain": False, "eager": False}


def test_inside_xla_compilation_in_keras_train_step():
    import keras

    class Probe(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.seen = []

        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 1), initializer="ones")

        def call(self, x):
            self.seen.append(fused.inside_xla_compilation())
            return x @ self.w

    x = np.ones((8, 3), np.float32)
    y = np.ones((8, 1), np.float32)
    for jit in (True, False):
        probe = Probe()
        model = keras.Sequential([keras.Input((3,)), probe])
        model.compile(optimizer="sgd", loss="mse", jit_compile=jit)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        assert probe.seen and probe.seen[-1] is jit, (jit, probe.seen)


def test_auto_uses_reference_under_xla_and_runs_on_cpu():
    cfg = StepConfig(20, 20, "paper")
    rng = np.random.default_rng(8)
    phi, grad, state = _inputs(rng, cfg, 500)
    chosen = {}

    @tf.function(jit_compile=True)
    def step(p, g, s):
        chosen["impl"] = ops.resolve_implementation("auto")
        return ops.lstm_step(tree(p, cfg), g, s, 0.1, cfg, implementation="auto")

    with tf.device("/CPU:0"):
        u, s = step(phi, grad, state)
    assert chosen["impl"] == "reference"
    ru, rs = reference_flat(phi, grad, state, 0.1, cfg)
    np.testing.assert_allclose(u.numpy(), ru.numpy(), rtol=1e-4, atol=1e-5)
    if fused.available():
        assert ops.resolve_implementation("auto") == "fused"

        @tf.function(jit_compile=True)
        def forced(p, g, s):
            return ops.lstm_step(tree(p, cfg), g, s, 0.1, cfg, implementation="fused")

        with pytest.raises(RuntimeError, match="XLA"):
            forced(phi, grad, state)


def test_library_load_failure_is_reported(monkeypatch, tmp_path, caplog):
    # A missing library: available() is False with the reason, and one log line says the pure-TF path is used.
    monkeypatch.setattr(fused, "_loaded", False)
    monkeypatch.setattr(fused, "_module", None)
    monkeypatch.setattr(fused, "_error", None)
    monkeypatch.setattr(fused, "library_path", lambda: str(tmp_path / "missing.so"))
    with caplog.at_level("WARNING", logger=fused.__name__):
        assert not fused.available()
        assert not fused.available()
    assert "missing.so" in fused.load_error()
    lines = [r for r in caplog.records if "pure-TensorFlow" in r.getMessage()]
    assert len(lines) == 1


def test_flat_phi_is_the_layout_of_the_kernels_and_differentiable():
    """ops.flat_phi (the one place that knows the kernels' layout) concatenates the leaves in layout.LEAVES order;
    the gradient of the fused op reaches every leaf of the tree."""
    _need_op()
    cfg = StepConfig(7, 5, "paper")
    rng = np.random.default_rng(9)
    phi, grad, state = _inputs(rng, cfg, 50)
    phi_tree = tree(phi, cfg)
    np.testing.assert_array_equal(ops.flat_phi(phi_tree, cfg).numpy(), phi.numpy())
    with tf.GradientTape() as tape:
        leaves = tf.nest.flatten(phi_tree)
        tape.watch(leaves)
        u, _ = ops.lstm_step(phi_tree, grad, state, 0.1, cfg, implementation="fused")
        loss = tf.reduce_sum(u ** 2)
    d_tree = tape.gradient(loss, phi_tree)
    with tf.GradientTape() as tape:
        tape.watch(phi)
        u, _ = fused.lstm_step(phi, grad, state, 0.1, cfg)
        loss = tf.reduce_sum(u ** 2)
    np.testing.assert_array_equal(ops.flat_phi(d_tree, cfg).numpy(), tape.gradient(loss, phi).numpy())
    bad = dict(phi_tree, out={"w": phi_tree["out"]["w"][:-1], "b": phi_tree["out"]["b"]})
    with pytest.raises(ValueError, match="out/w"):
        ops.lstm_step(bad, grad, state, 0.1, cfg, implementation="fused")


# ---- non-finite gradients: ±inf act as ±FLT_MAX (sign kept), NaN propagates; fused, reference and reference under XLA

FLT_MAX = float(np.finfo(np.float32).max)
INF_PAIRS = ((0, 2), (1, 3), (280, 282), (281, 283))  # (±inf, ±FLT_MAX) coordinates with equal states
MODE_CONFIGS = [StepConfig(7, 5, "none"), StepConfig(7, 5, "paper"), StepConfig(7, 5, "clamped", 3.0)]


def _infinite_inputs(rng, cfg, n=300, nan_at=None):
    """φ, grad and state with +inf, -inf, +FLT_MAX, -FLT_MAX at coordinates 0..3 (a whole 256-chunk of the CPU kernel)
    and 280..283 (the partial last one); each ±inf coordinate has the state of its ±FLT_MAX partner."""
    phi, grad, state = _inputs(rng, cfg, n)
    g, st = grad.numpy(), state.numpy()
    for base in (0, 280):
        g[base:base + 4] = [np.inf, -np.inf, FLT_MAX, -FLT_MAX]
    for a, b in INF_PAIRS:
        st[:, a] = st[:, b]
    if nan_at is not None:
        g[nan_at] = np.nan
    return phi, tf.constant(g), tf.constant(st)


def _run_step(implementation, phi, grad, state, scale, cfg):
    """(update, new_state) through the public switch; "xla": the reference compiled with jit_compile=True."""
    if implementation == "xla":
        step = tf.function(lambda p, g, s: ops.lstm_step(tree(p, cfg), g, s, scale, cfg, implementation="auto"),
                           jit_compile=True)
        return step(phi, grad, state)
    if implementation == "fused":
        _need_op()
    return ops.lstm_step(tree(phi, cfg), grad, state, scale, cfg, implementation=implementation)


@pytest.mark.parametrize("implementation", ["reference", "xla", "fused"])
@pytest.mark.parametrize("cfg", MODE_CONFIGS, ids=lambda c: c.preprocess)
def test_infinite_gradients_act_as_the_largest_finite_gradient(cfg, implementation):
    rng = np.random.default_rng([11, len(cfg.preprocess)])
    phi, grad, state = _infinite_inputs(rng, cfg, nan_at=[10, 290])
    u, s = (x.numpy() for x in _run_step(implementation, phi, grad, state, 0.1, cfg))
    for a, b in INF_PAIRS:
        assert u[a] == u[b], (a, u[a], u[b])
        np.testing.assert_array_equal(s[:, a], s[:, b])
    assert u[0] != u[1]  # the sign of the infinity is kept
    nan = [10, 290]
    assert np.isnan(u[nan]).all() and np.isnan(s[:, nan]).all()  # NaN propagates (documented)
    assert np.isfinite(np.delete(u, nan)).all() and np.isfinite(np.delete(s, nan, axis=1)).all()
    if implementation != "reference":
        ru, rs = _run_step("reference", phi, grad, state, 0.1, cfg)
        np.testing.assert_allclose(u, ru.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s, rs.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["reference", "fused"])
@pytest.mark.parametrize("cfg", MODE_CONFIGS, ids=lambda c: c.preprocess)
def test_gradient_at_infinite_gradients(cfg, implementation):
    # d_grad at ±inf is 0 (the clamp to ±FLT_MAX is flat beyond ±FLT_MAX); d_state at ±inf equals d_state at
    # ±FLT_MAX; every gradient finite; fused equals the reference.
    rng = np.random.default_rng([12, len(cfg.preprocess)])
    phi, grad, state = _infinite_inputs(rng, cfg)
    n = grad.shape[0]
    w_u = rng.standard_normal(n).astype(np.float32)
    w_s = rng.standard_normal((cfg.state_rows, n)).astype(np.float32)
    for a, b in INF_PAIRS:
        w_u[a] = w_u[b]
        w_s[:, a] = w_s[:, b]

    def gradients(impl, g=grad):
        if impl == "fused":
            _need_op()
        with tf.GradientTape() as tape:
            tape.watch([phi, g, state])
            u, s = ops.lstm_step(tree(phi, cfg), g, state, 0.3, cfg, implementation=impl)
            loss = tf.reduce_sum(u * w_u) + tf.reduce_sum(s * w_s)
        return [x.numpy() for x in tape.gradient(loss, [phi, g, state])]

    d_phi, d_grad, d_state = gradients(implementation)
    for x in (d_phi, d_grad, d_state):
        assert np.isfinite(x).all()
    infinite = [a for a, _ in INF_PAIRS]
    np.testing.assert_array_equal(d_grad[infinite], 0.0)
    for a, b in INF_PAIRS:
        np.testing.assert_array_equal(d_state[:, a], d_state[:, b])
    # The same gradients as with ±FLT_MAX in place of ±inf (d_grad apart from the infinite coordinates).
    c_phi, c_grad, c_state = gradients(implementation, tf.constant(np.clip(grad.numpy(), -FLT_MAX, FLT_MAX)))
    np.testing.assert_allclose(d_phi, c_phi, rtol=1e-6, atol=1e-6 * np.abs(c_phi).max())
    np.testing.assert_array_equal(d_state, c_state)
    np.testing.assert_array_equal(np.delete(d_grad, infinite), np.delete(c_grad, infinite))
    if implementation == "fused":
        # With "none" the raw gradient ±FLT_MAX enters the gates: d lstm1/w[:, 0] sums dz * FLT_MAX, where dz is 0
        # (the sigmoid is exactly 0 that far out in both implementations; a CPU kernel whose sigmoid stopped at
        # ~2e-35 gave ~1e4 there).
        reference_grads = gradients("reference")
        for x, y in zip((d_phi, d_grad, d_state), reference_grads):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(y).max()))


# ---- one validation for both implementations: the same exception type and message

def _bad_inputs():
    """name -> (changes to the good arguments, exception type, message pattern)."""
    cfg = StepConfig(7, 5, "paper")
    rng = np.random.default_rng(13)
    phi, grad, state = _inputs(rng, cfg, 20)
    good = dict(phi=tree(phi, cfg), grad=grad, state=state, scale=0.1)
    bad_leaf = dict(good["phi"], out={"w": good["phi"]["out"]["w"][:-1], "b": good["phi"]["out"]["b"]})
    f64_leaf = dict(good["phi"], lstm1={"w": tf.cast(good["phi"]["lstm1"]["w"], tf.float64),
                                        "b": good["phi"]["lstm1"]["b"]})
    cases = {
        "grad float64": (dict(grad=tf.cast(grad, tf.float64)), TypeError, "grad must be float32, got float64"),
        "grad numpy float64": (dict(grad=grad.numpy().astype(np.float64)), TypeError,
                               "grad must be float32, got float64"),
        "grad int32": (dict(grad=tf.cast(grad, tf.int32)), TypeError, "grad must be float32, got int32"),
        "state float64": (dict(state=tf.cast(state, tf.float64)), TypeError, "state must be float32, got float64"),
        "state float16": (dict(state=state.numpy().astype(np.float16)), TypeError,
                          "state must be float32, got float16"),
        "grad rank 2": (dict(grad=grad[None]), ValueError, "grad must have rank 1"),
        "grad rank 0": (dict(grad=grad[0]), ValueError, "grad must have rank 1"),
        "state rank 1": (dict(state=state[0]), ValueError, "state must have rank 2"),
        "state rows": (dict(state=state[:-1]), ValueError, r"state must have 24 rows"),
        "N mismatch": (dict(grad=grad[:-1]), ValueError, "disagree on N"),
        "scale inf": (dict(scale=float("inf")), ValueError, "scale must be finite, got inf"),
        "scale nan": (dict(scale=float("nan")), ValueError, "scale must be finite, got nan"),
        "scale numpy -inf": (dict(scale=np.float32(-np.inf)), ValueError, "scale must be finite, got -inf"),
        "scale tensor inf": (dict(scale=tf.constant(np.inf, tf.float32)), ValueError, "scale must be finite"),
        "scale float64 tensor": (dict(scale=tf.constant(0.1, tf.float64)), TypeError,
                                 "scale must be float32, got float64"),
        "scale vector": (dict(scale=tf.constant([0.1])), ValueError, "scale must have rank 0"),
        "phi leaf shape": (dict(phi=bad_leaf), ValueError, "phi leaf out/w must have shape"),
        "phi leaf float64": (dict(phi=f64_leaf), TypeError, "phi leaf lstm1/w must be float32, got float64"),
    }
    return cfg, good, cases


BAD_INPUT_NAMES = list(_bad_inputs()[2])


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
@pytest.mark.parametrize("name", BAD_INPUT_NAMES)
def test_bad_inputs_same_error_for_both_implementations(name, graph):
    cfg, good, cases = _bad_inputs()
    changes, error, pattern = cases[name]
    args = dict(good, **changes)

    def call(impl):
        def step():
            return ops.lstm_step(args["phi"], args["grad"], args["state"], args["scale"], cfg, implementation=impl)
        return tf.function(step, autograph=False)() if graph else step()  # (autograph would add its traceback)

    with pytest.raises(error, match=pattern) as reference_error:
        call("reference")
    if not fused.available():
        pytest.skip(f"fused op not built: {fused.load_error()} (the reference raised as expected)")
    with pytest.raises(error) as fused_error:
        call("fused")
    assert type(fused_error.value) is type(reference_error.value)
    assert str(fused_error.value) == str(reference_error.value)


def test_validate_step_inputs_is_the_shared_check():
    cfg, good, cases = _bad_inputs()
    grad, state, scale = ops.validate_step_inputs(good["grad"], good["state"], good["scale"], cfg)
    assert grad.dtype == tf.float32 and state.dtype == tf.float32 and scale.dtype == tf.float32
    changes, error, pattern = cases["grad float64"]
    with pytest.raises(error, match=pattern):
        ops.validate_step_inputs(changes["grad"], good["state"], good["scale"], cfg)


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_unknown_shapes_and_symbolic_scale(implementation):
    # Static checks only where shapes are known: unknown N, unknown rows and a symbolic scale still run; a non-finite
    # symbolic scale is an InvalidArgumentError at run time with the same message for both implementations.
    if implementation == "fused":
        _need_op()
    cfg, good, _ = _bad_inputs()
    f = tf.function(lambda g, s, sc: ops.lstm_step(good["phi"], g, s, sc, cfg, implementation=implementation),
                    input_signature=[tf.TensorSpec([None], tf.float32), tf.TensorSpec([None, None], tf.float32),
                                     tf.TensorSpec([], tf.float32)])
    u, s = f(good["grad"], good["state"], tf.constant(0.1))
    ru, rs = ops.lstm_step(good["phi"], good["grad"], good["state"], 0.1, cfg, implementation="reference")
    np.testing.assert_allclose(u.numpy(), ru.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.numpy(), rs.numpy(), rtol=1e-5, atol=1e-6)
    for bad in (np.inf, np.nan):
        with pytest.raises(tf.errors.InvalidArgumentError, match="lstm_step: scale must be finite"):
            f(good["grad"], good["state"], tf.constant(bad, tf.float32))
    # Unknown rank too.
    g = tf.function(lambda g, s: ops.lstm_step(good["phi"], g, s, 0.1, cfg, implementation=implementation),
                    input_signature=[tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.float32)])
    u2, _ = g(good["grad"], good["state"])
    np.testing.assert_allclose(u2.numpy(), ru.numpy(), rtol=1e-5, atol=1e-6)


def test_preprocess_param_range_checked_for_both_implementations():
    # Checked where StepConfig is built (so rules get it too), and again by the op's attrs.
    for mode in ("paper", "clamped"):
        for bad in (100.0, 1e-4):
            with pytest.raises(ValueError, match=r"preprocess_param must be in \[0.001, 80\]"):
                StepConfig(7, 5, mode, bad)
    module = _need_op()
    cfg = StepConfig(7, 5, "paper")
    phi, grad, state = _inputs(np.random.default_rng(14), cfg, 20)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"preprocess_param must be in \[0.001, 80\]"):
        module.l2l_lstm_step(phi, grad, state, tf.constant(1.0), hidden1=7, hidden2=5, preprocess="paper",
                             preprocess_param=100.0)
