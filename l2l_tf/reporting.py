"""Outputs shared by the experiment binaries: results.json, the paper-style figure, TensorBoard curves, and how
figures name and colour things.

Colours and labels are derived for any optimizer name: the paper's optimizers keep fixed ones (`COLORS`, `LABELS`;
the LSTM red in every figure), any other name ("lstm_single", "lstm_sub", ...) gets a deterministic colour of a
matplotlib palette (`color`; `colors` keeps the lines of one figure apart) and a readable label ("LSTM (single)").
Titles: `setting_title` (the MNIST settings' titles are `SETTING_TITLES["mnist"]`; other names are derived) and
`quadratic_title`.
"""
import functools
import json
import re
import zlib

import numpy as np

from l2l_tf.io import atomic_write

# One colour per known optimizer, the same in every figure.
COLORS = {"lstm": "tab:red", "sgd": "tab:green", "momentum": "tab:olive", "nag": "tab:blue",
          "rmsprop": "tab:purple", "adam": "tab:orange"}
LABELS = {"lstm": "LSTM", "sgd": "SGD", "momentum": "Momentum", "nag": "NAG", "rmsprop": "RMSprop", "adam": "ADAM"}
# Qualitative matplotlib palettes whose colours go to other names (less the colours of COLORS).
PALETTES = ("tab10", "tab20", "Dark2")

# Panel titles of the settings the binaries report, by experiment; `setting_title` derives the others.
SETTING_TITLES = {
    "mnist": {"base": "MNIST, 20 sigmoid units, 100 steps", "steps200": "MNIST, 200 steps",
              "units40": "MNIST, 40 units", "layers2": "MNIST, 2 hidden layers", "relu": "MNIST, ReLU"},
}
EXPERIMENT_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10", "cifar": "CIFAR-10", "quadratic": "Quadratics"}
_WORDS = {"relu": "ReLU", "sigmoid": "sigmoid", "tanh": "tanh", "lstm": "LSTM"}


# ---- names, colours, titles ----
@functools.cache
def palette():
    """The colours (hex strings) given to names outside COLORS: the PALETTES' colours in order, without those of
    COLORS and without repeats."""
    import matplotlib
    from matplotlib import colors as mcolors

    taken = {mcolors.to_hex(c) for c in COLORS.values()}
    result = []
    for name in PALETTES:
        for c in matplotlib.colormaps[name].colors:
            c = mcolors.to_hex(c)
            if c not in taken:
                taken.add(c)
                result.append(c)
    return tuple(result)


def _slot(name):
    return zlib.crc32(name.encode("utf-8")) % len(palette())  # stable across runs (unlike hash())


def color(name):
    """The colour of optimizer `name`: COLORS' for the known ones, else a palette colour fixed by the name."""
    return COLORS[name] if name in COLORS else palette()[_slot(name)]


def colors(names):
    """{name: colour} for the lines of one figure: known names keep COLORS', the others their `color` unless
    another name of the figure has it already, then the next free palette colour (names taken in sorted order,
    so the result depends on the set of names only). Colours repeat only past the palette's size."""
    names = list(dict.fromkeys(names))
    result = {name: COLORS[name] for name in names if name in COLORS}
    used = set(result.values())
    table = palette()
    for name in sorted(n for n in names if n not in COLORS):
        start = _slot(name)
        for offset in range(len(table)):
            candidate = table[(start + offset) % len(table)]
            if candidate not in used:
                break
        else:
            candidate = table[start]
        result[name] = candidate
        used.add(candidate)
    return {name: result[name] for name in names}


def label(name):
    """A legend label: LABELS' for the known names, else the name's first part as a label and the rest in
    parentheses ("lstm_single" → "LSTM (single)", "adam_warm" → "ADAM (warm)", "yogi" → "Yogi")."""
    if name in LABELS:
        return LABELS[name]
    head, *rest = [part for part in re.split(r"[_\-\s]+", name) if part] or [name]
    text = LABELS.get(head, _WORDS.get(head, head[:1].upper() + head[1:]))
    return f"{text} ({' '.join(rest)})" if rest else text


def is_learned(name):
    """True for the learned optimizers' names ("lstm", "lstm_*"): drawn thicker."""
    return name == "lstm" or name.startswith("lstm_")


def _describe(setting):
    """A setting name in words: "steps200" → "200 steps", "units40" → "40 units", "layers2" → "2 layers",
    "relu" → "ReLU", "wide_relu" → "wide ReLU"."""
    words = []
    for part in filter(None, re.split(r"[_\-\s]+", setting)):
        match = re.fullmatch(r"([A-Za-z]+)(\d+)", part)
        if match:
            words.append(f"{match.group(2)} {match.group(1)}")
        else:
            words.append(_WORDS.get(part.lower(), part))
    return " ".join(words) or setting


def setting_title(name, experiment="mnist"):
    """The panel title of setting `name` of an experiment: SETTING_TITLES' when listed, else derived
    ("MNIST, 40 units" for setting "units40"; "CIFAR-10, 2 layers" for "layers2" of "cifar10")."""
    titles = SETTING_TITLES.get(experiment, {})
    if name in titles:
        return titles[name]
    prefix = EXPERIMENT_NAMES.get(experiment, experiment)
    return f"{prefix}, {_describe(name)}" if prefix else _describe(name)


def quadratic_title(num_dims, distribution):
    return f"Quadratics ({num_dims}-d, {distribution})"


# ---- files ----
def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def public(results):
    """`results` without the raw arrays (keys starting with "_")."""
    return {k: v for k, v in results.items() if not k.startswith("_")}


def plot_curves(path, panels, ylabel="loss"):
    """Writes a PNG with one log-scale panel per (title, {optimizer: summary}) in `panels`; an optimizer has the
    same colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    line_colors = colors([name for _, results in panels for name in public(results)])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, results) in zip(axes[0], panels):
        for name, summary in public(results).items():
            curve = np.asarray(summary["mean_loss"])
            text = label(name)
            if summary.get("learning_rate") is not None:
                text += f" (lr {summary['learning_rate']:.3g})"
            ax.plot(np.arange(len(curve)), curve, color=line_colors[name], label=text,
                    linewidth=2.0 if is_learned(name) else 1.2)
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
