"""CIFAR-10 with train / validation / test splits kept apart, from TFDS or a directory of CIFAR-10 "python" batches.

    splits = load_cifar10()                                   # TFDS where it works, else the Keras cache directory
    splits = load_cifar10(directory="/data/cifar-10-batches-py")          # what --cifar_dir=DIR selects
    splits = load_cifar10(labels=(0, 1, 2, 3, 4))                         # a 5-class subset, labels remapped to 0..4

Returns {"train": (x, y), "validation": (x, y), "test": (x, y)} of numpy arrays: x float32 [N, 32, 32, 3] (NHWC, as
Keras convnets take it) with pixels scaled to [0, 1], y int32 [N]. The splits never share an image: meta-training
uses "train", baseline tuning and early stopping "validation", every reported curve "test".

Sources. `source="tfds"`: tensorflow-datasets' `cifar10` (train 50,000 / test 10,000). As with MNIST, a prepared
copy in the TFDS data_dir (`data_dir`, default `$TFDS_DATA_DIR` or `~/tensorflow_datasets`) is used without touching
the network; otherwise the download host (www.cs.toronto.edu) is probed with a 2 s timeout before TFDS is asked to
download, and `Cifar10UnavailableError` is raised at once when it cannot be reached.
`source="directory"`: the standard CIFAR-10 "python version" layout (`data_batch_1` .. `data_batch_5`, `test_batch`,
`batches.meta`), by default the Keras cache (`keras.datasets.cifar10` keeps it under `$KERAS_HOME/datasets`,
`~/.keras/datasets` without KERAS_HOME: as `cifar-10-batches-py/`, or as `cifar-10-batches-py-target/
cifar-10-batches-py/` with the Keras 3 releases that extract to a `-target` folder; both are looked in). The number
of images is read from each file (the originals hold 10,000 per batch, any other count works).
`source="auto"` (the default): a given `directory` is used as such; else a prepared TFDS copy; else a TFDS download
when the host answers within seconds; else the Keras cache directory; else `Cifar10UnavailableError` within seconds,
naming the TFDS data_dir, the Keras cache directory and the `--cifar_dir` flag.

Validation is held out from the training batches: a `numpy.random.default_rng(seed)` permutation of the training
images picks `validation_size` of them (a float in [0, 1) is a fraction of the training images, rounded down; an int
a count; default 0.1: 5,000 of CIFAR-10's 50,000). Both sources are split this way, so the same seed gives the same
hold-out whichever source read the same images. Train and validation keep the images' file order.

Label filter. `labels=(3, 5)` keeps only those classes, in every split, and remaps them to 0..k-1 in the given order
(3 -> 0, 5 -> 1). The hold-out is drawn before the filter: an image is in the same split whatever subset is asked for.

Security. The python batches are pickles, and unpickling a file runs whatever code it names. The files are read with
a restricted unpickler that only lets the numpy array reconstruction globals (`ndarray`, `dtype`, `_reconstruct`,
`_frombuffer`) through, plus a latin-1-only stand-in for `_codecs.encode` (how Python 3 writes bytes under pickle
protocols 0-2). The standard files hold only dicts, lists, bytes, ints and one uint8 array; a file naming anything
else is refused with a ValueError naming the file.
"""
import os
import pickle

import numpy as np

# Shared with MNIST: the TFDS data_dir default, the "is it prepared" check and the short network probe.
from l2l_tf.datasets.mnist import NETWORK_TIMEOUT_S, default_data_dir, network_available, tfds_is_prepared

SPLITS = ("train", "validation", "test")
NUM_CLASSES = 10
LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (32, 32, 3)
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
DEFAULT_VALIDATION_SIZE = 0.1
TFDS_NAME = "cifar10"
# Where TFDS downloads CIFAR-10 from (tfds.image_classification.cifar: Cifar10._cifar_info.url).
DOWNLOAD_HOST = ("www.cs.toronto.edu", 443)
KERAS_SUBDIRS = ("cifar-10-batches-py", os.path.join("cifar-10-batches-py-target", "cifar-10-batches-py"))
FLAG = "--cifar_dir"


class Cifar10UnavailableError(RuntimeError):
    """CIFAR-10 could not be found (no prepared TFDS copy, no network, no Keras cache, no such directory)."""


# ---- where the data can be ----
def keras_home():
    """Keras' home as keras.datasets uses it: $KERAS_HOME, else ~/.keras (/tmp/.keras when ~ is not writable)."""
    if "KERAS_HOME" in os.environ:
        return os.path.expanduser(os.environ["KERAS_HOME"])
    home = os.path.expanduser("~")
    return os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")


def keras_cache_dirs():
    """The directories where `keras.datasets.cifar10.load_data()` leaves the python batches, first the classic one."""
    return [os.path.join(keras_home(), "datasets", sub) for sub in KERAS_SUBDIRS]


def keras_cache_dir():
    """The first Keras cache directory that holds the batches, else the classic one (`.../cifar-10-batches-py`)."""
    for directory in keras_cache_dirs():
        if _has_batches(directory):
            return directory
    return keras_cache_dirs()[0]


def _has_batches(directory):
    return os.path.isdir(directory) and any(
        os.path.exists(os.path.join(directory, name)) for name in TRAIN_BATCHES + (TEST_BATCH,))


def where_to_get_it(data_dir=None):
    """The sentence every 'not found' error ends with: both places looked in and the flag to point elsewhere."""
    return (f"CIFAR-10 is looked for (1) as the prepared TFDS data set {TFDS_NAME!r} in the TFDS data_dir "
            f"{default_data_dir(data_dir)!r} (prepare it on a networked machine with `python -c \"import "
            f"tensorflow_datasets as tfds; tfds.load('{TFDS_NAME}', data_dir='DIR')\"` and copy DIR; --data_dir=DIR), "
            f"and (2) in the Keras cache directory {keras_cache_dirs()[0]!r} (or {keras_cache_dirs()[1]!r}), where "
            "`keras.datasets.cifar10.load_data()` leaves the CIFAR-10 python batches. Elsewhere: point "
            f"{FLAG}=DIR (load_cifar10(directory=DIR)) at a directory in the CIFAR-10 python layout "
            f"({', '.join(TRAIN_BATCHES[:1])} .. {TRAIN_BATCHES[-1]}, {TEST_BATCH}, {META_FILE}; "
            "from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz).")


# ---- the python batches ----
_ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),   # files written with numpy < 2 (the original CIFAR-10 ones)
    ("numpy._core.multiarray", "_reconstruct"),  # files written with numpy >= 2
    ("numpy.core.numeric", "_frombuffer"),       # pickle protocol 5 (numpy < 2, numpy >= 2)
    ("numpy._core.numeric", "_frombuffer"),
})


def _latin1_bytes(text, encoding):
    """What `_codecs.encode` does for the bytes a Python 3 pickle of protocol < 3 holds, and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode(..., {encoding!r}) in a CIFAR-10 batch")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: nothing in the file can name a function to call."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # Python 3 writes bytes so under protocols 0-2
            return _latin1_bytes
        raise pickle.UnpicklingError(f"refusing to unpickle the global {module}.{name} (only numpy arrays, dicts, "
                                     "lists, bytes and ints are allowed in a CIFAR-10 batch)")


def _unpickle(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing; a CIFAR-10 python directory holds {', '.join(TRAIN_BATCHES)}, "
                         f"{TEST_BATCH} and {META_FILE}")
    try:
        with open(path, "rb") as f:
            content = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as error:  # truncated, not a pickle, a refused global, ...
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def read_batch(path):
    """(x uint8 [n, 32, 32, 3], y int32 [n]) from one python batch file; n is read from the file.

    The file is a pickle of {b"data": uint8 [n, 3072], b"labels": [n ints in 0..9], b"batch_label", maybe
    b"filenames"}; each data row holds 1024 red, 1024 green, then 1024 blue values of a 32x32 image in row-major
    order. Any deviation is a ValueError naming the file.
    """
    content = _unpickle(path)
    for key in ("data", "labels"):
        if key not in content:
            raise ValueError(f"{path}: no b{key!r} entry (keys: {sorted(content)})")
    data, labels = content["data"], content["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        description = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                       else type(data).__name__)
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape [n, 3072] (32x32 pixels x 3 channels), "
                         f"got {description}")
    try:
        labels = np.asarray(labels)
    except Exception as error:
        raise ValueError(f"{path}: b'labels' is not a list of ints ({error})") from error
    if labels.ndim != 1 or (labels.dtype.kind not in "iu" and len(labels) > 0):
        raise ValueError(f"{path}: b'labels' must be a list of ints, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    images = data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1)  # [n, channel, row, col] -> NHWC
    return np.ascontiguousarray(images), labels.astype(np.int32)


def read_label_names(directory):
    """The class names in `batches.meta` (b"label_names"), as str, in label order."""
    path = os.path.join(directory, META_FILE)
    content = _unpickle(path)
    names = content.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise ValueError(f"{path}: b'label_names' must list {NUM_CLASSES} names, got {names!r}")
    return [name.decode("utf-8") if isinstance(name, bytes) else str(name) for name in names]


def read_directory(directory):
    """{"train": (x uint8, y int32) from data_batch_1..5 concatenated, "test": from test_batch}.

    A directory without batches but with a `cifar-10-batches-py/` inside (the extracted archive's parent, as recent
    Keras 3 releases leave it) is read through that subdirectory.
    """
    if not os.path.isdir(directory):
        raise Cifar10UnavailableError(f"no directory {directory!r}. " + where_to_get_it())
    inner = os.path.join(directory, KERAS_SUBDIRS[0])
    if not _has_batches(directory) and _has_batches(inner):
        directory = inner
    train = [read_batch(os.path.join(directory, name)) for name in TRAIN_BATCHES]
    x_test, y_test = read_batch(os.path.join(directory, TEST_BATCH))
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    for split, x in (("training", x_train), ("test", x_test)):
        if len(x) == 0:
            raise ValueError(f"{directory}: the {split} batches hold no images")
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


# ---- TFDS ----
def read_tfds(data_dir=None, download=True, timeout=NETWORK_TIMEOUT_S):
    """{"train", "test": (x uint8 [N, 32, 32, 3], y int32)} from TFDS' cifar10; fails within seconds when offline."""
    import tensorflow_datasets as tfds

    directory = default_data_dir(data_dir)
    prepared = tfds_is_prepared(TFDS_NAME, directory)
    if not prepared:
        if not download:
            raise Cifar10UnavailableError(f"no prepared TFDS {TFDS_NAME!r} in {directory!r} and download=False. "
                                          + where_to_get_it(data_dir))
        if not network_available(DOWNLOAD_HOST, timeout=timeout):
            raise Cifar10UnavailableError(
                f"CIFAR-10 is not prepared in the TFDS data_dir {directory!r} and {DOWNLOAD_HOST[0]} cannot be "
                f"reached within {timeout:g} s (no network?), so tensorflow-datasets cannot download it. "
                + where_to_get_it(data_dir))
    loaded = tfds.load(TFDS_NAME, split=["train", "test"], data_dir=directory, as_supervised=True,
                       download=not prepared, shuffle_files=False)
    return {split: _tfds_arrays(dataset, split) for split, dataset in zip(("train", "test"), loaded)}


def _tfds_arrays(dataset, split):
    xs, ys = [], []
    for image, label in dataset.batch(4096).as_numpy_iterator():
        xs.append(np.asarray(image, np.uint8))
        ys.append(np.asarray(label))
    if not xs:
        raise Cifar10UnavailableError(f"the TFDS {TFDS_NAME!r} split {split!r} is empty")
    x = np.concatenate(xs)
    if x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"TFDS {TFDS_NAME!r} images have shape {x.shape[1:]}, expected {IMAGE_SHAPE}")
    return x, np.concatenate(ys).astype(np.int32)


# ---- splits ----
def validation_count(num_train, validation_size=DEFAULT_VALIDATION_SIZE):
    """How many of `num_train` training images are held out: a float in [0, 1) is a fraction (rounded down)."""
    if isinstance(validation_size, (bool, np.bool_)):
        raise ValueError(f"validation_size must be a fraction in [0, 1) or a count, got {validation_size!r}")
    if isinstance(validation_size, (float, np.floating)):
        if not 0.0 <= validation_size < 1.0:
            raise ValueError(f"a fractional validation_size must lie in [0, 1), got {validation_size}")
        count = int(num_train * float(validation_size))
    elif isinstance(validation_size, (int, np.integer)):
        count = int(validation_size)
    else:
        raise ValueError(f"validation_size must be a fraction in [0, 1) or a count, got {validation_size!r}")
    if not 0 <= count < num_train:
        raise ValueError(f"validation_size {validation_size!r} must leave at least one of the {num_train} training "
                         "images for training")
    return count


def check_labels(labels):
    """The label filter as a tuple of distinct ints in 0..9 (None: all ten classes, unchanged)."""
    if labels is None:
        return None
    chosen = tuple(int(label) for label in labels)
    if not chosen or len(set(chosen)) != len(chosen) or min(chosen) < 0 or max(chosen) >= NUM_CLASSES:
        raise ValueError(f"labels must be distinct CIFAR-10 classes in 0..{NUM_CLASSES - 1}, got {labels!r}")
    return chosen


def label_names(labels=None):
    """The class names in the order of the (remapped) labels."""
    chosen = check_labels(labels)
    return list(LABEL_NAMES) if chosen is None else [LABEL_NAMES[label] for label in chosen]


def filter_labels(x, y, labels):
    """Keeps the images whose label is in `labels`, remapped to their position in `labels` (0..k-1)."""
    chosen = check_labels(labels)
    if chosen is None:
        return x, y
    remap = np.full(NUM_CLASSES, -1, np.int32)
    remap[list(chosen)] = np.arange(len(chosen), dtype=np.int32)
    keep = remap[y] >= 0
    return x[keep], remap[y[keep]]


def make_splits(raw, validation_size=DEFAULT_VALIDATION_SIZE, seed=0, labels=None):
    """{"train", "validation", "test"} (x float32 in [0, 1], y int32) from {"train", "test"} uint8 arrays."""
    x_train, y_train = raw["train"]
    held_out = validation_count(len(x_train), validation_size)
    order = np.random.default_rng(seed).permutation(len(x_train))
    validation_index = np.sort(order[:held_out])
    train_index = np.sort(order[held_out:])
    chosen = {"train": (x_train[train_index], y_train[train_index]),
              "validation": (x_train[validation_index], y_train[validation_index]),
              "test": raw["test"]}
    out = {}
    for split in SPLITS:
        x, y = filter_labels(*chosen[split], labels)
        out[split] = (x.astype(np.float32) / 255.0, np.asarray(y, np.int32))
    return out


def load_cifar10(source="auto", directory=None, data_dir=None, validation_size=DEFAULT_VALIDATION_SIZE, seed=0,
                 labels=None, timeout=NETWORK_TIMEOUT_S):
    """{"train"|"validation"|"test": (x float32 [N, 32, 32, 3] in [0, 1], y int32 [N])}; see the module docstring.

    source: "auto" (default), "tfds" or "directory". directory: a CIFAR-10 python directory (what --cifar_dir
    names); with source="directory" and no directory, the Keras cache. data_dir: the TFDS data_dir.
    """
    check_labels(labels)  # a bad filter fails before any data is read
    if source not in ("auto", "tfds", "directory"):
        raise ValueError(f"source must be 'auto', 'tfds' or 'directory', got {source!r}")
    if source == "tfds":
        if directory is not None:
            raise ValueError("directory is only read with source='directory' or 'auto'")
        raw = read_tfds(data_dir, timeout=timeout)
    elif source == "directory" or directory is not None:
        path = os.path.expanduser(directory) if directory is not None else keras_cache_dir()
        if directory is None and not _has_batches(path):
            raise Cifar10UnavailableError(f"no CIFAR-10 python batches in the Keras cache directory {path!r}. "
                                          + where_to_get_it(data_dir))
        raw = read_directory(path)
    elif tfds_is_prepared(TFDS_NAME, default_data_dir(data_dir)) or network_available(DOWNLOAD_HOST, timeout=timeout):
        raw = read_tfds(data_dir, timeout=timeout)
    else:
        path = keras_cache_dir()
        if not _has_batches(path):
            raise Cifar10UnavailableError(
                f"CIFAR-10 not found: no prepared TFDS copy, {DOWNLOAD_HOST[0]} unreachable within {timeout:g} s "
                f"(no network?), and no Keras cache. " + where_to_get_it(data_dir))
        raw = read_directory(path)
    return make_splits(raw, validation_size, seed, labels)
