"""Meta-training resumes only its own checkpoints, says so, keeps its early-stopping count, and TensorBoard shows
each epoch once after a resume; a bad checkpoint is an error naming the file and what to do."""
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf
# What TensorBoard itself loads runs through (it drops data orphaned at a restart marker; its v1
# event_accumulator keeps TF2 tensor summaries whatever the markers say).
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

from l2l_tf import LSTMUpdateRule, ops
from l2l_tf.problems import QuadraticFamily
from l2l_tf.training import MetaTrainer, summaries
from l2l_tf.training.checkpoints import CheckpointError

RULE = LSTMUpdateRule(4, 3, "none", output_scale=0.1)


def trainer(family=None, **kwargs):
    kwargs = {"num_steps": 6, "unroll_length": 3, "seed": 3, "implementation": "reference", **kwargs}
    return MetaTrainer(RULE, family or QuadraticFamily(batch_size=4, num_dims=3), **kwargs)


def flat(tree):
    return ops.flat_phi(tf.nest.map_structure(tf.convert_to_tensor, tree), RULE.step_config).numpy()


def run(directory, epochs, make=trainer, **kwargs):
    t = make()
    t.train(epochs, validation_every=2, num_validation_problems=1, checkpoint_dir=str(directory), verbose=0,
            **kwargs)
    return t


@pytest.mark.parametrize("change, field", [
    (dict(seed=4), "seed: 3 in the checkpoint vs 4 now"),
    (dict(family=QuadraticFamily(batch_size=4, num_dims=5)), "family.num_dims: 3 in the checkpoint vs 5 now"),
    (dict(family=QuadraticFamily(batch_size=4, num_dims=3, distribution="uniform")), "family.distribution"),
    (dict(loss_weights=np.arange(1, 7)), "loss_weights"),
    (dict(learning_rate=3e-3), "meta_learning_rate: 0.001 in the checkpoint vs 0.003 now"),
    (dict(second_derivatives=True), "second_derivatives"),
    (dict(run_config={"phase": 2}), "run_config.phase: null in the checkpoint vs 2 now"),
])
def test_a_checkpoint_of_another_run_is_refused_naming_the_fields(tmp_path, change, field):
    run(tmp_path, 2)
    other = trainer(**change)
    with pytest.raises(CheckpointError, match="written by another run") as error:
        other.train(4, validation_every=2, num_validation_problems=1, checkpoint_dir=str(tmp_path), verbose=0)
    assert field in str(error.value) and "meta_trainer.npz" in str(error.value) and "--restart" in str(error.value)
    assert other.epoch == 0


def test_more_epochs_and_another_patience_still_resume(tmp_path, capsys):
    run(tmp_path, 2)
    resumed = run(tmp_path, 4, patience=5)
    assert resumed.resumed_from == 2 and resumed.epoch == 4
    resumed.train(4, validation_every=2, num_validation_problems=1, checkpoint_dir=str(tmp_path), verbose=1)
    assert "resumed from epoch 4" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no_state", "nan_phi"])
def test_a_bad_checkpoint_is_an_error_naming_the_file_and_restart(tmp_path, damage):
    run(tmp_path, 2)
    path = tmp_path / "meta_trainer.npz"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:
        arrays = dict(np.load(path))
        if damage == "no_state":
            del arrays["state"]
        else:
            arrays["phi/lstm1/w"] = np.full_like(arrays["phi/lstm1/w"], np.nan)
        np.savez(path, **arrays)
    fresh = trainer()
    with pytest.raises(CheckpointError) as error:
        fresh.restore(str(tmp_path))
    message = str(error.value)
    assert str(path) in message and "--restart" in message
    if damage == "nan_phi":
        assert "lstm1/w" in message and "non-finite" in message
    assert fresh.epoch == 0 and np.all(np.isfinite(flat(fresh.phi)))
    # restart=True starts fresh and overwrites the bad file with a good one.
    again = run(tmp_path, 2, restart=True)
    assert again.resumed_from is None and again.epoch == 2
    trainer().restore(str(tmp_path))


def test_the_early_stopping_count_is_checkpointed(tmp_path):
    """A run stopped early by patience stops at the same epoch when it is interrupted and resumed on the way."""
    make = lambda: trainer(learning_rate=0.3)  # large meta steps: validation gets worse soon
    straight = make()
    straight.train(40, validation_every=1, num_validation_problems=1, patience=1, verbose=0)
    assert straight.epoch < 40, "the run must stop early for this test to mean something"
    interrupted = make()
    interrupted.train(straight.epoch - 1, validation_every=1, num_validation_problems=1, patience=1, verbose=0,
                      checkpoint_dir=str(tmp_path))
    assert interrupted.stale_validations == straight.stale_validations - 1 > 0
    resumed = make()
    resumed.train(40, validation_every=1, num_validation_problems=1, patience=1, verbose=0,
                  checkpoint_dir=str(tmp_path))
    assert resumed.resumed_from == straight.epoch - 1 and resumed.epoch == straight.epoch
    np.testing.assert_array_equal(flat(resumed.best_phi), flat(straight.best_phi))


def scalar_steps(logdir, tag):
    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    events.Reload()
    return [e.step for e in events.Tensors(tag)], events


def test_tensorboard_holds_each_epoch_once_after_a_resume(tmp_path):
    """An interrupted run logged epoch 3 after its last checkpoint (epoch 2); the resumed run logs 3 again: the
    loaded curves hold 1..5 once each (TensorBoard drops the orphaned step at the restart marker)."""
    logdir, checkpoints = tmp_path / "tb", tmp_path / "ckpt"
    first = trainer()
    first.train(3, validation_every=10, checkpoint_every=2, num_validation_problems=1, verbose=0,
                checkpoint_dir=str(checkpoints), logdir=str(logdir))
    assert scalar_steps(logdir, "meta_loss")[0] == [1, 2, 3]
    os.remove(checkpoints / "meta_trainer.npz")
    first_two = trainer()
    first_two.train(2, validation_every=10, checkpoint_every=2, num_validation_problems=1, verbose=0,
                    checkpoint_dir=str(checkpoints))  # the checkpoint at epoch 2 the killed run had left
    resumed = trainer()
    resumed.train(5, validation_every=10, checkpoint_every=2, num_validation_problems=1, verbose=0,
                  checkpoint_dir=str(checkpoints), logdir=str(logdir))
    assert resumed.resumed_from == 2
    steps, events = scalar_steps(logdir, "meta_loss")
    assert steps == [1, 2, 3, 4, 5]
    tags = set(events.Tags()["tensors"])
    assert {"meta_gradient_norm", "meta_learning_rate", "validation_loss", "skipped_steps"} <= tags
    assert any(t.startswith("phi/") for t in tags) and any(t.startswith("validation_problem/updates/") for t in tags)
    assert any(t.startswith("validation_problem/gradients/theta") for t in tags)
    rates = [float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors("meta_learning_rate")]
    np.testing.assert_allclose(rates, 1e-3)
    assert all(np.isfinite(float(tf.make_ndarray(e.tensor_proto))) and float(tf.make_ndarray(e.tensor_proto)) > 0
               for e in events.Tensors("meta_gradient_norm"))


def test_the_restart_marker_loads_after_a_run_of_the_same_second(tmp_path):
    """A run that ended within the second the next one starts in: its event file (host names sort after the marker's
    "!") must still load before the marker, or TensorBoard would keep its steps next to the new run's."""
    now = int(time.time())
    earlier = tmp_path / f"events.out.tfevents.{now:010d}.zz-host.1.1.v2"
    earlier.write_bytes(b"")
    summaries.mark_restart(str(tmp_path), 1)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0] == earlier.name and "!restart" in names[1], names


def test_restart_starts_fresh_and_tensorboard_forgets_the_old_run(tmp_path):
    logdir, checkpoints = tmp_path / "tb", tmp_path / "ckpt"
    run(checkpoints, 4, logdir=str(logdir))
    fresh = run(checkpoints, 2, restart=True, logdir=str(logdir))
    assert fresh.resumed_from is None and fresh.epoch == 2
    assert scalar_steps(logdir, "meta_loss")[0] == [1, 2]
    state = json.loads(str(np.load(checkpoints / "meta_trainer.npz")["state"]))
    assert state["epoch"] == 2


def test_bad_train_arguments():
    t = trainer()
    for kwargs, name in ((dict(validation_every=0), "validation_every"), (dict(num_validation_problems=0),
                         "num_validation_problems"), (dict(checkpoint_every=0), "checkpoint_every")):
        with pytest.raises(ValueError, match=name):
            t.train(2, verbose=0, **{"validation_every": 1, **kwargs})
