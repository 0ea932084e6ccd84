"""What meta-training shows in TensorBoard beyond scalars: φ, the learned optimizer's gradients and updates on a
fixed problem, and the restart marker that keeps a resumed run's curves free of the steps it repeats."""
import os
import socket
import time

import tensorflow as tf

from l2l_tf import evaluation
from l2l_tf.rules import leaf_paths


def mark_restart(logdir, step):
    """Writes a SessionLog.START event at `step` into `logdir`, in a file that sorts before the events the run
    writes next. Written at the start of every run (fresh or resumed): TensorBoard takes a directory's first START
    as the session's start and, at every later one, drops the steps ≥ `step` logged before it, i.e. what an
    interrupted run wrote after its last checkpoint (`tf.summary` has no purge argument of its own)."""
    os.makedirs(logdir, exist_ok=True)
    # Event files load in name order, by the second they were made in, then "!" before the host name of the next
    # writer's file of that second. So the marker must be of a later second than every file already there (an
    # earlier run of this second would otherwise load after it, and its steps would not be dropped): wait for one.
    latest = max((int(name.split(".")[3]) for name in os.listdir(logdir)
                  if name.startswith("events.out.tfevents.") and name.split(".")[3].isdigit()), default=0)
    while int(time.time()) <= latest:
        time.sleep(latest + 1 - time.time())
    path = os.path.join(logdir, f"events.out.tfevents.{int(time.time()):010d}.!restart.{socket.gethostname()}"
                                f".{os.getpid()}")
    events = [tf.compat.v1.Event(wall_time=time.time(), file_version="brain.Event:2"),
              tf.compat.v1.Event(wall_time=time.time(), step=int(step),
                                 session_log=tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START))]
    with tf.io.TFRecordWriter(path) as writer:
        for event in events:
            writer.write(event.SerializeToString())


def trajectory(family, rule, phi, problem, num_steps, implementation="auto"):
    """Runs the learned optimizer on one problem: (losses [T], gradients, updates), the last two lists over steps
    of lists over tensors."""
    @tf.function
    def step(params, extra, state, t):
        loss, grads, extra = evaluation.value_and_grad(family, params, extra, problem.data, t)
        updates, state = rule.step(phi, list(grads), state, implementation=implementation)
        return loss, list(grads), updates, tuple(p + u for p, u in zip(params, updates)), extra, state

    params, extra, state = problem.params, problem.extra, rule.init_state(family.param_specs())
    losses, gradients, updates = [], [], []
    for t in range(num_steps):
        loss, grads, ups, params, extra, state = step(params, extra, state, tf.constant(t))
        losses.append(float(loss))
        gradients.append(grads)
        updates.append(ups)
    return losses, gradients, updates


def log_phi(phi, step, prefix="phi/"):
    """Histograms of φ's leaves (call inside a writer's `as_default()`)."""
    for path, leaf in leaf_paths(phi):
        tf.summary.histogram(prefix + path, tf.convert_to_tensor(leaf), step=step)


def log_trajectory(family, gradients, updates, step, prefix=""):
    """Histograms, per optimizee tensor, of its gradients and of the learned optimizer's updates over a whole run."""
    for i, spec in enumerate(family.param_specs()):
        name = spec.name.replace("/", "_")
        tf.summary.histogram(f"{prefix}gradients/{name}", tf.stack([g[i] for g in gradients]), step=step)
        tf.summary.histogram(f"{prefix}updates/{name}", tf.stack([u[i] for u in updates]), step=step)
