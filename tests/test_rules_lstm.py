"""The LSTM rule (l2l_tf/rules/lstm.py): its math by hand and against float64 NumPy, φ as a tree, φ files, and
one step of the shipped φ against what the code before rules/ computed (tests/fixtures/legacy)."""
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

import lstm_step_numpy
from l2l_tf import LSTMUpdateRule, RuleState, load_phi, ops, save_phi
from l2l_tf.rules import LSTMUpdateRule as RulesLSTM
from l2l_tf.update_rule import LSTMOptimizerState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY = os.path.join(ROOT, "tests", "fixtures", "legacy")


def random_phi(rule, seed=0, scale=0.5):
    """A random φ tree (built from a flat vector through the ops layer's layout)."""
    flat = np.random.default_rng(seed).normal(0, scale, rule.num_params).astype(np.float32)
    return ops.phi_tree(flat, rule.step_config)


def numpy_tree(phi):
    return {layer: {part: np.asarray(v) for part, v in parts.items()} for layer, parts in phi.items()}


def test_hand_derived_single_unit_step():
    # hidden 1/1, raw gradient. With every weight zero and zero biases all gates are σ(0) = 1/2 and the cell
    # candidate tanh(0) = 0, so c' = c/2 and h' = tanh(c/2)/2; the output is wo·h2' + bo.
    rule = LSTMUpdateRule(1, 1, "none", output_scale=0.5)
    phi = {layer: {part: tf.zeros(shape) for part, shape in parts.items()} for layer, parts in rule.phi_shapes().items()}
    phi["out"] = {"w": tf.constant([2.0]), "b": tf.constant([0.25])}
    state = tf.constant([[0.3], [2.0], [0.7], [-4.0]])  # h1, c1, h2, c2
    updates, new_state = rule.step(phi, [tf.constant([5.0])], RuleState((state,)), implementation="reference")
    h2 = math.tanh(-2.0) / 2
    np.testing.assert_allclose(new_state.per_coordinate[0].numpy()[:, 0], [math.tanh(1.0) / 2, 1.0, h2, -2.0],
                               rtol=1e-6)
    np.testing.assert_allclose(updates[0].numpy(), [0.5 * (2.0 * h2 + 0.25)], rtol=1e-6)


@pytest.mark.parametrize("implementation", ["reference", "auto"])
@pytest.mark.parametrize("preprocess", ["none", "paper", "clamped"])
def test_step_matches_float64_numpy(preprocess, implementation):
    rule = LSTMUpdateRule(7, 5, preprocess, output_scale=0.1)
    rng = np.random.default_rng(1)
    phi = random_phi(rule)
    g = lstm_step_numpy.extreme_gradients(rng, 300)
    state = rng.normal(size=(rule.state_rows, 300)).astype(np.float32)
    (update,), new_state = rule.step(phi, [tf.constant(g)], RuleState((tf.constant(state),)),
                                     implementation=implementation)
    with np.errstate(over="ignore"):
        ref_update, ref_state = lstm_step_numpy.lstm_step_np(numpy_tree(phi), g, state, 0.1, 7, 5, preprocess,
                                                             rule.preprocess_param)
    np.testing.assert_allclose(update.numpy(), ref_update, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.per_coordinate[0].numpy(), ref_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["quadratic", "mnist"])
@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_shipped_phi_step_equals_the_code_before_rules(name, implementation):
    """One step of the shipped φ on fixed inputs (extreme and random gradients, three tensors) equals, within 1e-6
    relative, what the flat-φ code computed (make_legacy_fixtures.py, same implementation)."""
    if implementation == "fused" and not ops.fused_available():
        pytest.skip("the fused op library is not built")
    rule, phi, _ = load_phi(os.path.join(ROOT, "l2l_tf", "pretrained", f"{name}.npz"))
    recorded = np.load(os.path.join(LEGACY, "step_outputs.npz"))
    grads = [tf.constant(recorded[f"{name}/grad{i}"]) for i in range(3)]
    state = RuleState(tuple(tf.constant(recorded[f"{name}/state{i}"]) for i in range(3)))
    updates, new_state = rule.step(phi, grads, state, implementation=implementation)
    for i in range(3):
        for got, key in ((updates[i], "update"), (new_state.per_coordinate[i], "new_state")):
            want = recorded[f"{name}/{implementation}/{key}{i}"]
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def run_steps(rule, phi, grad_seq, shapes):
    state = rule.init_state([tf.zeros(s) for s in shapes])
    out = []
    for grads in grad_seq:
        updates, state = rule.step(phi, grads, state, implementation="reference")
        out.append([u.numpy() for u in updates])
    return out, state


def test_permuting_coordinates_permutes_updates():
    rule = LSTMUpdateRule()
    phi = random_phi(rule, 3)
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=50).astype(np.float32) * 1e-2 for _ in range(4)]
    perm = rng.permutation(50)
    plain, _ = run_steps(rule, phi, [[tf.constant(g)] for g in grads], [(50,)])
    permuted, _ = run_steps(rule, phi, [[tf.constant(g[perm])] for g in grads], [(50,)])
    for a, b in zip(plain, permuted):
        np.testing.assert_allclose(a[0][perm], b[0], rtol=1e-6, atol=1e-9)
    assert not np.allclose(plain[-1][0], plain[-1][0][0])  # the updates really differ across coordinates


def test_each_tensor_keeps_its_own_state():
    rule = LSTMUpdateRule()
    phi = random_phi(rule, 4)
    rng = np.random.default_rng(1)
    seq_a = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(3)]
    seq_b = [rng.normal(size=(5,)).astype(np.float32) for _ in range(3)]
    joint, state = run_steps(rule, phi, [[tf.constant(a), tf.constant(b)] for a, b in zip(seq_a, seq_b)],
                             [(3, 4), (5,)])
    alone_a, _ = run_steps(rule, phi, [[tf.constant(a)] for a in seq_a], [(3, 4)])
    other_b, _ = run_steps(rule, phi, [[tf.constant(a), tf.constant(-3 * b)] for a, b in zip(seq_a, seq_b)],
                           [(3, 4), (5,)])
    for j, a, o in zip(joint, alone_a, other_b):
        np.testing.assert_allclose(j[0], a[0], rtol=1e-6)
        np.testing.assert_allclose(o[0], a[0], rtol=1e-6)  # b's gradients never leak into a's updates
    assert [s.shape for s in state.per_coordinate] == [(80, 12), (80, 5)]
    assert state.shared == ()


def test_shapes_and_dtypes_round_trip():
    rule = LSTMUpdateRule()
    params = [tf.constant(1.5), tf.ones([7]), tf.ones([3, 3, 2, 4], tf.float16), tf.ones([2, 3], tf.float64)]
    updates, state = rule.step(rule.init_phi(), params, rule.init_state(params))
    assert [tuple(u.shape) for u in updates] == [(), (7,), (3, 3, 2, 4), (2, 3)]
    assert [u.dtype for u in updates] == [tf.float32, tf.float32, tf.float16, tf.float64]
    assert all(s.dtype == tf.float32 for s in state.per_coordinate)


def test_phi_tree_layout_and_init():
    """φ is {"lstm1": {"w", "b"}, "lstm2": {"w", "b"}, "out": {"w", "b"}} in today's orientation; the flat vector
    of the kernels (and of old φ files) is these leaves concatenated in that order."""
    rule = LSTMUpdateRule(hidden1=6, hidden2=5, preprocess="paper")
    assert rule.phi_shapes() == {"lstm1": {"w": (24, 8), "b": (24,)}, "lstm2": {"w": (20, 11), "b": (20,)},
                                 "out": {"w": (5,), "b": (1,)}}
    phi = rule.init_phi(7)
    np.testing.assert_array_equal(phi["lstm1"]["b"].numpy()[6:12], 1.0)   # forget gate (i, f, g, o)
    np.testing.assert_array_equal(phi["lstm1"]["b"].numpy()[:6], 0.0)
    np.testing.assert_array_equal(phi["lstm2"]["b"].numpy()[5:10], 1.0)
    flat = ops.flat_phi(phi, rule.step_config).numpy()
    pieces = [phi["lstm1"]["w"], phi["lstm1"]["b"], phi["lstm2"]["w"], phi["lstm2"]["b"], phi["out"]["w"],
              phi["out"]["b"]]
    np.testing.assert_array_equal(flat, np.concatenate([np.ravel(p) for p in pieces]))
    back = ops.phi_tree(flat, rule.step_config)
    for layer in phi:
        for part in phi[layer]:
            np.testing.assert_array_equal(back[layer][part].numpy(), phi[layer][part].numpy())
    again, other = rule.init_phi(7), rule.init_phi(8)
    np.testing.assert_array_equal(ops.flat_phi(again, rule.step_config), flat)
    assert not np.array_equal(ops.flat_phi(other, rule.step_config), flat)


def test_init_phi_output_gain_scales_only_the_output_layer():
    rule = LSTMUpdateRule()
    plain, small = rule.init_phi(3), rule.init_phi(3, output_gain=0.1)
    for layer, part in (("lstm1", "w"), ("lstm1", "b"), ("lstm2", "w"), ("lstm2", "b"), ("out", "b")):
        np.testing.assert_array_equal(small[layer][part].numpy(), plain[layer][part].numpy())
    np.testing.assert_allclose(small["out"]["w"].numpy(), 0.1 * plain["out"]["w"].numpy(), rtol=1e-6)
    assert np.any(plain["out"]["w"].numpy() != 0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="implementation"):
        LSTMUpdateRule(implementation="reference")  # a run-time argument of step, not part of the rule
    with pytest.raises(ValueError, match="output_scale"):
        LSTMUpdateRule(output_scale=float("nan"))
    rule = LSTMUpdateRule()
    with pytest.raises(ValueError, match="implementation"):
        rule.step(rule.init_phi(), [tf.ones(3)], rule.init_state([tf.ones(3)]), implementation="cuda")
    with pytest.raises(ValueError, match="flat vector of 5141"):
        rule.check_phi(tf.zeros([10]))
    bad = rule.init_phi()
    bad["lstm2"]["w"] = tf.zeros([80, 41])
    with pytest.raises(ValueError, match="lstm2/w"):
        rule.check_phi(bad)
    with pytest.raises(ValueError, match="lstm2/w"):
        rule.step(bad, [tf.ones(3)], rule.init_state([tf.ones(3)]), implementation="reference")
    with pytest.raises(ValueError, match="gradients"):
        rule.step(rule.init_phi(), [tf.ones(3)], rule.init_state([tf.ones(3), tf.ones(2)]))


def test_config_names_no_implementation_and_old_imports_work():
    rule = LSTMUpdateRule(hidden1=8, preprocess="clamped", output_scale=0.01)
    assert "implementation" not in rule.get_config()
    assert LSTMUpdateRule.from_config(rule.get_config()) == rule
    assert RulesLSTM is LSTMUpdateRule
    state = LSTMOptimizerState((tf.zeros([2 * (8 + 20), 3]),))  # today's spelling of the state
    assert state.lstm is state.per_coordinate and state.shared == ()
    flat = np.random.default_rng(0).normal(size=rule.num_params).astype(np.float32)
    updates, _ = rule.step(tf.constant(flat), [tf.ones(3)], state)  # a flat φ is still accepted
    tree_updates, _ = rule.step(ops.phi_tree(flat, rule.step_config), [tf.ones(3)], state)
    np.testing.assert_array_equal(updates[0].numpy(), tree_updates[0].numpy())


def test_save_and_load_phi(tmp_path):
    rule = LSTMUpdateRule(hidden1=8, preprocess="clamped", output_scale=0.01)
    phi = random_phi(rule, 5)
    path = tmp_path / "phi.npz"
    save_phi(str(path), rule, phi, note="x")
    with np.load(path) as data:
        assert int(data["format_version"]) == 2
        assert json.loads(str(data["rule"])) == {"name": "lstm", "config": rule.get_config()}
        assert sorted(k for k in data.files if k.startswith("phi/")) == [
            "phi/lstm1/b", "phi/lstm1/w", "phi/lstm2/b", "phi/lstm2/w", "phi/out/b", "phi/out/w"]
    loaded_rule, loaded_phi, metadata = load_phi(str(path))
    assert loaded_rule == rule and metadata == {"note": "x"}
    np.testing.assert_array_equal(ops.flat_phi(loaded_phi, rule.step_config), ops.flat_phi(phi, rule.step_config))
    with pytest.raises(FileNotFoundError):
        load_phi(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a"):
        load_phi(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "nan.npz", phi=np.full(rule.num_params, np.nan, np.float32),
             config=json.dumps(rule.get_config()))
    with pytest.raises(ValueError, match="non-finite"):
        load_phi(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "future.npz", format_version=3, rule="{}")
    with pytest.raises(ValueError, match="format version 3"):
        load_phi(str(tmp_path / "future.npz"))
    np.savez(tmp_path / "unknown.npz", format_version=2, rule=json.dumps({"name": "bogus", "config": {}}))
    with pytest.raises(ValueError, match="unknown update rule 'bogus'"):
        load_phi(str(tmp_path / "unknown.npz"))
    arrays = {k: v for k, v in np.load(path).items() if k != "phi/out/w"}
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(ValueError, match="out/w"):
        load_phi(str(tmp_path / "partial.npz"))


@pytest.mark.parametrize("name", ["quadratic", "mnist"])
def test_shipped_version_1_files_load_unchanged(name):
    """The shipped files are format version 1 (flat φ, a config with "implementation"): they load, the tree is
    the flat vector split in the kernels' layout, and the runtime field is dropped from the rule."""
    path = os.path.join(ROOT, "l2l_tf", "pretrained", f"{name}.npz")
    with np.load(path) as data:
        assert "format_version" not in data.files
        flat, config = data["phi"], json.loads(str(data["config"]))
    rule, phi, metadata = load_phi(path)
    assert rule == LSTMUpdateRule(**{k: v for k, v in config.items() if k != "implementation"})
    np.testing.assert_array_equal(ops.flat_phi(phi, rule.step_config).numpy(), flat)
    assert metadata["experiment"] == name


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_save_phi_refuses_a_non_finite_phi_and_writes_nothing(tmp_path, bad):
    """A diverged φ must not reach a file (load_phi would refuse it): ValueError naming the leaf, no file written and
    an existing file left as it was."""
    rule = LSTMUpdateRule(hidden1=4, hidden2=3, preprocess="clamped", output_scale=0.1)
    phi = {layer: {part: v.numpy().copy() for part, v in parts.items()} for layer, parts in rule.init_phi(1).items()}
    phi["lstm2"]["w"][1, 2] = bad
    fresh = tmp_path / "fresh.npz"
    with pytest.raises(ValueError, match=r"'lstm2/w'.*non-finite"):
        save_phi(str(fresh), rule, phi)
    assert not fresh.exists()
    existing = tmp_path / "existing.npz"
    save_phi(str(existing), rule, rule.init_phi(2), note="good")
    before = existing.read_bytes()
    with pytest.raises(ValueError, match="non-finite"):
        save_phi(str(existing), rule, ops.flat_phi(phi, rule.step_config))  # the flat form too
    assert existing.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["existing.npz"]  # no temporary file left behind
