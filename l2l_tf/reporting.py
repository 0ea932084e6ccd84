"""Outputs shared by the experiment binaries: results.json, the paper-style figure (mean curves with the 25–75%
band over test problems), TensorBoard (curves, the run's flags, the tuning scores, the figure), and how figures name
and colour things.

Colours and labels are derived for any optimizer name: the paper's optimizers keep fixed ones (`COLORS`, `LABELS`;
the LSTM red in every figure), any other name ("lstm_single", "lstm_sub", ...) gets a deterministic colour of a
matplotlib palette (`color`; `colors` keeps the lines of one figure apart) and a readable label ("LSTM (single)").
Titles: `setting_title` (the MNIST settings' titles are `SETTING_TITLES["mnist"]`; other names are derived) and
`quadratic_title`.
"""
import functools
import json
import math
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


# ---- console ----
def print_table(title, optimizers, steps, marks):
    """Prints each optimizer's mean loss at the steps `marks` and its final mean ± std, then, for each learned
    optimizer, whether it is below every tuned baseline (those with a learning rate) at every step 20..T."""
    print(f"\n{title}")
    width = max([10] + [len(label(opt)) + 1 for opt in optimizers])
    print(f"{'optimizer':<{width}}{'lr':>8}" + "".join(f"{'t=' + str(t):>9}" for t in marks) + f"{'final ± std':>18}")
    for opt, summary in optimizers.items():
        lr = "-" if summary["learning_rate"] is None else f"{summary['learning_rate']:.3g}"
        curve = summary["mean_loss"]
        print(f"{label(opt):<{width}}{lr:>8}" + "".join(f"{curve[t]:>9.4f}" for t in marks)
              + f"{summary['final_loss_mean']:>10.4f} ± {summary['final_loss_std']:.3f}")
    tuned = [opt for opt, summary in optimizers.items() if summary["learning_rate"] is not None]
    if tuned:
        best = np.min([optimizers[opt]["mean_loss"] for opt in tuned], axis=0)
        window = slice(min(20, steps), steps + 1)
        for opt in (o for o in optimizers if is_learned(o)):
            below = bool(np.all(np.asarray(optimizers[opt]["mean_loss"])[window] < best[window]))
            print(f"{label(opt)} below every tuned baseline at every step {window.start}..{steps}: {below}")


# ---- files ----
def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def public(results):
    """`results` without the raw arrays (keys starting with "_")."""
    return {k: v for k, v in results.items() if not k.startswith("_")}


def tuning_table(results):
    """The results.json "tuning" entry of `evaluation.compare`'s results: {baseline: [[learning rate, mean
    validation final loss (null: diverged)], ...]} in grid order."""
    return {name: [[float(lr), float(score) if math.isfinite(score) else None] for lr, score in scores.items()]
            for name, scores in results.get("_tuning", {}).items()}


def plot_curves(path, panels, ylabel="loss"):
    """Writes a PNG with one log-scale panel per (title, {optimizer: summary}) in `panels`; an optimizer has the
    same colour in every panel. Each mean curve is drawn over the band between its summary's 25% and 75% quantiles
    over the test problems ("q25", "q75"), where the summary has them."""
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
            steps = np.arange(len(curve))
            ax.plot(steps, curve, color=line_colors[name], label=text, linewidth=2.0 if is_learned(name) else 1.2)
            if summary.get("q25") is not None and summary.get("q75") is not None:
                ax.fill_between(steps, np.asarray(summary["q25"]), np.asarray(summary["q75"]),
                                color=line_colors[name], alpha=0.2, linewidth=0)
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


def _markdown_cell(value):
    return str(value).replace("|", "\\|")


def log_flags(writer, values, step=0):
    """TensorBoard text "flags": the run's flag values ({name: value}) as a markdown table."""
    import tensorflow as tf

    rows = [f"| {_markdown_cell(name)} | `{_markdown_cell(json.dumps(value))}` |" for name, value in values.items()]
    with writer.as_default():
        tf.summary.text("flags", "\n".join(["| flag | value |", "|---|---|", *rows]), step=step)
    writer.flush()


def log_tuning(writer, results, prefix="", step=0):
    """TensorBoard, per baseline of `evaluation.compare`'s results: the text table `{prefix}tuning/{name}` of the
    mean validation final loss at each learning rate (the chosen one in bold) and the scalar
    `{prefix}tuned_learning_rate/{name}`."""
    import tensorflow as tf

    with writer.as_default():
        for name, scores in results.get("_tuning", {}).items():
            chosen = results[name]["learning_rate"] if name in results else None
            rows = [f"| **{lr:g}** | **{score:.6g}** |" if lr == chosen else f"| {lr:g} | {score:.6g} |"
                    for lr, score in scores.items()]
            tf.summary.text(f"{prefix}tuning/{name}",
                            "\n".join(["| learning rate | validation final loss |", "|---|---|", *rows]), step=step)
            if chosen is not None:
                tf.summary.scalar(f"{prefix}tuned_learning_rate/{name}", chosen, step=step)
    writer.flush()


def log_figure(writer, path, name="figure", step=0):
    """TensorBoard image `name`: the PNG figure at `path` (what `plot_curves` wrote)."""
    import tensorflow as tf

    with open(path, "rb") as f:
        image = tf.image.decode_png(f.read(), channels=4)
    with writer.as_default():
        tf.summary.image(name, image[tf.newaxis], step=step)
    writer.flush()
