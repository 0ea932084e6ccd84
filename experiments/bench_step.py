"""Benchmark of one coordinatewise LSTM optimizer step: pure TensorFlow vs the fused op.

    python experiments/bench_step.py [--sizes=100000,1000000] [--repeats=5] [--json=FILE]

Implementations: tf_eager (l2l_tf.ops.reference eagerly), tf_function (reference in tf.function),
tf_xla (reference in tf.function(jit_compile=True)), fused (the custom op in tf.function).
Passes: forward (update and new state), forward_backward (forward, then the gradient of a loss of both outputs
with respect to phi through GradientTape: the meta-training pattern; the backward also produces the gradients to
the state and the gradient input, as it does in meta-training).

Reported: median ms per step over --repeats timed calls after warm-up; GB/s of the minimum bytes moved per
coordinate at fp32 state with S = 2 (hidden1 + hidden2) rows (80 at the default 20/20):
  forward            4 (1 + 1 + S) read (grad, theta or update, state) + 4 (1 + S) written          = 652 B
  forward_backward   forward + backward reads grad, state, d_update, d_new_state 4 (2 + 2 S) and
                     writes d_grad, d_state 4 (1 + S)                                   = 652 + 972 = 1624 B
and the speed-up over the fastest pure-TF variant for the same size and pass (> 1: faster). The table also shows
the process CPU time per step (all threads): on a machine shared with other work, wall times inflate and it tells
how much of the machine each variant needed. The JSON records hold the wall times.
"""
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from l2l_tf.ops import StepConfig, fused, reference  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["100000", "1000000"], "Numbers of coordinates N.")
flags.DEFINE_list("impls", ["tf_eager", "tf_function", "tf_xla", "fused"], "Implementations to time.")
flags.DEFINE_list("passes", ["forward", "forward_backward"], "Passes to time.")
flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (tracing, XLA compilation).")
flags.DEFINE_integer("hidden1", 20, "Units of the first LSTM layer.")
flags.DEFINE_integer("hidden2", 20, "Units of the second LSTM layer.")
flags.DEFINE_enum("preprocess", "paper", ["none", "paper", "clamped"], "Gradient preprocessing.")
flags.DEFINE_string("json", None, "Write the records [{impl, n, pass, ms}] to this file.")
flags.DEFINE_integer("threads", 0, "TensorFlow intra-op threads (0: TensorFlow's default, all cores).")

TF_IMPLS = ("tf_eager", "tf_function", "tf_xla")


def bytes_per_coord(pass_name, cfg):
    s = cfg.state_rows
    forward = 4 * (1 + 1 + s) + 4 * (1 + s)
    if pass_name == "forward":
        return forward
    return forward + 4 * (2 + 2 * s) + 4 * (1 + s)


def make_step(impl, cfg):
    if impl == "fused":
        if not fused.available():
            raise RuntimeError(f"fused op unavailable: {fused.load_error()}")
        return fused.lstm_step
    return reference.lstm_step


def make_pass(impl, pass_name, cfg):
    step = make_step(impl, cfg)

    def forward(phi, grad, state, scale):
        return step(phi, grad, state, scale, cfg)

    def forward_backward(phi, grad, state, scale):
        with tf.GradientTape() as tape:
            tape.watch(phi)
            update, new_state = step(phi, grad, state, scale, cfg)
            loss = tf.reduce_sum(update) + tf.reduce_sum(new_state)
        return tape.gradient(loss, phi), update, new_state

    fn = forward if pass_name == "forward" else forward_backward
    if impl == "tf_eager":
        return fn
    return tf.function(fn, jit_compile=(impl == "tf_xla"))


def time_calls(fn, args, warmup, repeats):
    """(median wall ms, median process CPU ms) per call; CPU time (all threads) helps reading a shared machine."""
    for _ in range(warmup):
        out = fn(*args)
        _ = [t.shape for t in tf.nest.flatten(out)]
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        _ = tf.nest.flatten(out)[0].numpy()  # CPU functions return after running; this fetch is a formality
        times.append(1e3 * (time.perf_counter() - start))
        cpu.append(1e3 * (time.process_time() - start_cpu))
        del out
    return statistics.median(times), statistics.median(cpu)


def main(argv):
    del argv
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    cfg = StepConfig(FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess)
    rng = np.random.default_rng(0)
    records, cpu = [], {}
    print(f"hidden {cfg.hidden1}/{cfg.hidden2}, preprocess {cfg.preprocess!r}, {os.cpu_count()} CPUs, "
          f"intra-op threads {FLAGS.threads or 'default'}, TensorFlow {tf.__version__}", flush=True)
    for n in (int(float(s)) for s in FLAGS.sizes):
        phi = tf.constant((rng.standard_normal(cfg.num_params) * 0.3).astype(np.float32))
        grad = tf.constant((rng.standard_normal(n) * 1e-3).astype(np.float32))
        state = tf.constant((rng.standard_normal((cfg.state_rows, n)) * 0.5).astype(np.float32))
        scale = tf.constant(0.1)
        for pass_name in FLAGS.passes:
            for impl in FLAGS.impls:
                if impl == "fused" and not fused.available():
                    print(f"skipping fused: {fused.load_error()}", flush=True)
                    continue
                ms, cpu_ms = time_calls(make_pass(impl, pass_name, cfg), (phi, grad, state, scale), FLAGS.warmup,
                                        FLAGS.repeats)
                records.append({"impl": impl, "n": n, "pass": pass_name, "ms": ms})
                cpu[(impl, n, pass_name)] = cpu_ms
                print(f"  {impl:12s} N={n:<9d} {pass_name:17s} {ms:9.2f} ms (cpu {cpu_ms:.1f} ms)", flush=True)

    print()
    header = (f"{'impl':12s} {'N':>9s} {'pass':17s} {'ms/step':>9s} {'GB/s':>7s} {'vs best TF':>10s} "
              f"{'cpu ms':>9s}")
    print(header)
    print("-" * len(header))
    for r in records:
        best_tf = min((q["ms"] for q in records if q["n"] == r["n"] and q["pass"] == r["pass"]
                       and q["impl"] in TF_IMPLS), default=None)
        gbs = bytes_per_coord(r["pass"], cfg) * r["n"] / (r["ms"] * 1e-3) / 1e9
        ratio = f"{best_tf / r['ms']:9.2f}x" if best_tf else f"{'-':>10s}"
        print(f"{r['impl']:12s} {r['n']:9d} {r['pass']:17s} {r['ms']:9.2f} {gbs:7.2f} {ratio} "
              f"{cpu[(r['impl'], r['n'], r['pass'])]:9.1f}")

    if FLAGS.json:
        path = os.path.abspath(FLAGS.json)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".bench_step.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, path)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    app.run(main)
