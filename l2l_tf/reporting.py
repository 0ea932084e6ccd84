"""Outputs shared by the experiment binaries: results.json, the paper-style figure, TensorBoard curves."""
import json

import numpy as np

from l2l_tf.io import atomic_write

# One colour per optimizer, the same in every figure.
COLORS = {"lstm": "tab:red", "sgd": "tab:green", "momentum": "tab:olive", "nag": "tab:blue",
          "rmsprop": "tab:purple", "adam": "tab:orange"}
LABELS = {"lstm": "LSTM", "sgd": "SGD", "momentum": "Momentum", "nag": "NAG", "rmsprop": "RMSprop", "adam": "ADAM"}


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def public(results):
    """`results` without the raw arrays (keys starting with "_")."""
    return {k: v for k, v in results.items() if not k.startswith("_")}


def plot_curves(path, panels, ylabel="loss"):
    """Writes a PNG with one log-scale panel per (title, {optimizer: summary}) in `panels`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels):
        for name, summary in public(results).items():
            curve = np.asarray(summary["mean_loss"])
            label = LABELS.get(name, name)
            if summary.get("learning_rate") is not None:
                label += f" (lr {summary['learning_rate']:.3g})"
            ax.plot(np.arange(len(curve)), curve, color=COLORS.get(name), label=label,
                    linewidth=2.0 if name == "lstm" else 1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def log_curves(writer, results, prefix=""):
    """TensorBoard scalars `{prefix}{optimizer}/loss` at every step of each mean curve."""
    import tensorflow as tf

    with writer.as_default():
        for name, summary in public(results).items():
            for step, value in enumerate(summary["mean_loss"]):
                tf.summary.scalar(f"{prefix}{name}/loss", value, step=step)
    writer.flush()
