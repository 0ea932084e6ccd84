"""CIFAR-10 data (l2l_tf/datasets/cifar10.py): the python-batch reader on directories written here (any image count,
exact pixel layout, bad files named), the seeded validation hold-out, the label filter, the source order (TFDS,
Keras cache, --cifar_dir) with its fast offline failure, the TFDS path (mocked) and the shared real-image copy."""
import hashlib
import os
import pickle
import shutil
import time

import numpy as np
import pytest

from l2l_tf import datasets
from l2l_tf.datasets import cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "cifar-10-batches-py"))
TRAIN_SIZES = (7, 13, 4, 9, 11)   # 44 training images, deliberately not 10,000 per batch
TEST_SIZE = 6


def encode(images):
    """NHWC uint8 images -> the python batches' rows: 1024 red, 1024 green, 1024 blue values, each row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_batch(path, images, labels, protocol=pickle.HIGHEST_PROTOCOL, **extra):
    content = {b"batch_label": b"a test batch", b"labels": [int(label) for label in labels], b"data": encode(images)}
    content.update(extra)
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=protocol)


def write_directory(directory, seed=0, train_sizes=TRAIN_SIZES, test_size=TEST_SIZE):
    """A CIFAR-10 python directory of random images; returns {"train", "test": (images uint8 NHWC, labels)}."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    written = {"train": ([], []), "test": ([], [])}
    for name, size, split in [(f"data_batch_{i + 1}", n, "train") for i, n in enumerate(train_sizes)] + [
            ("test_batch", test_size, "test")]:
        images = rng.integers(0, 256, size=(size, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=size)
        write_batch(os.path.join(directory, name), images, labels)
        written[split][0].append(images)
        written[split][1].append(labels)
    with open(os.path.join(directory, "batches.meta"), "wb") as f:
        pickle.dump({b"num_cases_per_batch": 10000, b"num_vis": 3072,
                     b"label_names": [name.encode() for name in cifar10.LABEL_NAMES]}, f, protocol=2)
    return {split: (np.concatenate(images), np.concatenate(labels)) for split, (images, labels) in written.items()}


def digests(x):
    return [hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest() for image in x]


@pytest.fixture
def cifar_dir(tmp_path):
    directory = str(tmp_path / "cifar-10-batches-py")
    return directory, write_directory(directory)


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """HOME, KERAS_HOME and TFDS_DATA_DIR all point at empty directories under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KERAS_HOME", str(home / "keras"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(home / "tfds"))
    return home


# ---- the python-batch reader ----
def test_directory_image_counts_come_from_the_files(cifar_dir, no_network):
    directory, written = cifar_dir
    splits = cifar10.load_cifar10(directory=directory, validation_size=0)
    assert splits["train"][0].shape == (sum(TRAIN_SIZES), 32, 32, 3)
    assert splits["test"][0].shape == (TEST_SIZE, 32, 32, 3)
    assert splits["validation"][0].shape == (0, 32, 32, 3) and splits["validation"][1].shape == (0,)
    for split in ("train", "test"):
        x, y = splits[split]
        assert x.dtype == np.float32 and y.dtype == np.int32
        np.testing.assert_array_equal(x, written[split][0].astype(np.float32) / 255.0)  # file order kept
        np.testing.assert_array_equal(y, written[split][1])
    assert no_network == []  # a named directory never probes the network


def test_pixel_layout_is_row_major_rgb_planes(tmp_path):
    """One known pixel, at an asymmetric place, lands at [row, col, channel] (NHWC), scaled to [0, 1]."""
    directory = str(tmp_path / "layout")
    write_directory(directory, train_sizes=(1, 1, 1, 1, 1), test_size=1)
    data = np.zeros((2, 3072), np.uint8)
    row, col = 3, 29
    data[1, 2 * 1024 + row * 32 + col] = 255        # image 1: blue, row 3, column 29
    data[1, 0 * 1024 + 30 * 32 + 1] = 51            # image 1: red, row 30, column 1
    with open(os.path.join(directory, "test_batch"), "wb") as f:
        pickle.dump({b"batch_label": b"layout", b"labels": [4, 8], b"data": data}, f, protocol=2)
    x, y = cifar10.load_cifar10(directory=directory, validation_size=0)["test"]
    assert x.shape == (2, 32, 32, 3) and list(y) == [4, 8]
    assert x[1, row, col, 2] == 1.0 and x[1, 30, 1, 0] == pytest.approx(0.2)
    assert np.count_nonzero(x) == 2 and np.count_nonzero(x[0]) == 0
    raw, labels = cifar10.read_batch(os.path.join(directory, "test_batch"))
    assert raw.dtype == np.uint8 and raw[1, row, col, 2] == 255 and raw[1, 30, 1, 0] == 51
    assert labels.dtype == np.int32


def test_files_written_by_numpy_1_and_python_2_protocols_are_read(tmp_path):
    """The original CIFAR-10 files name numpy.core.multiarray (numpy < 2) in a protocol-2 pickle."""
    path = str(tmp_path / "old_batch")
    images = np.random.default_rng(1).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    blob = pickle.dumps({b"batch_label": b"old", b"labels": [1, 2, 3], b"data": encode(images),
                         b"filenames": [b"a.png", b"b.png", b"c.png"]}, protocol=2)
    if b"numpy._core.multiarray" in blob:  # written by numpy >= 2: respell it as numpy 1 did
        blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in blob
    with open(path, "wb") as f:
        f.write(blob)
    x, y = cifar10.read_batch(path)
    np.testing.assert_array_equal(x, images)
    assert list(y) == [1, 2, 3]


def test_label_names_from_batches_meta(cifar_dir):
    directory, _ = cifar_dir
    assert cifar10.read_label_names(directory) == list(cifar10.LABEL_NAMES)
    assert datasets.CIFAR10_LABEL_NAMES[0] == "airplane" and datasets.CIFAR10_LABEL_NAMES[9] == "truck"


class _Executes:
    """A pickle payload that would create `marker` if unpickling ran the code it names."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _truncate(path):
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])


def _overwrite(content):
    def write(path):
        with open(path, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                pickle.dump(content, f, protocol=2)
    return write


def _executes(path):
    with open(path, "wb") as f:
        pickle.dump({b"labels": [0], b"data": _Executes(path + ".executed")}, f)


class _Codec:
    """_codecs.encode is let through for latin-1 bytes only."""

    def __reduce__(self):
        import codecs
        return codecs.encode, ("uryyb", "rot13")


def _other_codec(path):
    with open(path, "wb") as f:
        pickle.dump({b"labels": [0], b"data": _Codec()}, f, protocol=2)


IMAGES_3 = np.zeros((3, 3072), np.uint8)
BAD_FILES = {
    "truncated": (_truncate, "not a readable CIFAR-10 python batch"),
    "not a pickle": (_overwrite(b"this is not a pickle\n" * 10), "not a readable CIFAR-10 python batch"),
    "empty file": (_overwrite(b""), "not a readable CIFAR-10 python batch"),
    "a list, not a dict": (_overwrite([1, 2, 3]), "expected a pickled dict"),
    "no data": (_overwrite({b"labels": [1, 2, 3]}), "no b'data' entry"),
    "no labels": (_overwrite({b"data": IMAGES_3}), "no b'labels' entry"),
    "wrong data shape": (_overwrite({b"labels": [1, 2, 3], b"data": np.zeros((3, 1024), np.uint8)}),
                         "shape [n, 3072]"),
    "wrong data type": (_overwrite({b"labels": [1, 2, 3], b"data": np.zeros((3, 3072), np.float32)}),
                        "must be a uint8 array"),
    "data as bytes": (_overwrite({b"labels": [1], b"data": bytes(3072)}), "must be a uint8 array"),
    "label count": (_overwrite({b"labels": [1, 2], b"data": IMAGES_3}), "3 images but 2 labels"),
    "label range": (_overwrite({b"labels": [1, 2, 10], b"data": IMAGES_3}), "labels must lie in 0..9"),
    "label type": (_overwrite({b"labels": [b"cat", b"dog", b"cat"], b"data": IMAGES_3}), "list of ints"),
    "code in the pickle": (_executes, "refusing to unpickle the global"),
    "another codec": (_other_codec, "refusing _codecs.encode(..., 'rot13')"),
    "missing batch": (os.remove, "missing"),
}


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch"])
@pytest.mark.parametrize("problem", sorted(BAD_FILES))
def test_bad_file_is_a_clear_error_naming_it(cifar_dir, problem, name):
    directory, _ = cifar_dir
    path = os.path.join(directory, name)
    damage, expected = BAD_FILES[problem]
    damage(path)
    with pytest.raises(ValueError) as error:
        cifar10.load_cifar10(directory=directory)
    message = str(error.value)
    assert path in message and expected in message, message
    assert not os.path.exists(path + ".executed")  # the restricted unpickler never ran the payload


def test_bad_batches_meta_is_named(cifar_dir):
    directory, _ = cifar_dir
    path = os.path.join(directory, "batches.meta")
    _overwrite({b"label_names": [b"cat"]})(path)
    with pytest.raises(ValueError, match="10 names") as error:
        cifar10.read_label_names(directory)
    assert path in str(error.value)
    cifar10.load_cifar10(directory=directory)  # the images themselves do not need it


def test_missing_directory_names_it_and_the_flag(tmp_path, no_network):
    missing = str(tmp_path / "nowhere")
    started = time.perf_counter()
    with pytest.raises(datasets.Cifar10UnavailableError) as error:
        datasets.load_cifar10(directory=missing)
    assert time.perf_counter() - started < 5.0
    assert missing in str(error.value) and "--cifar_dir" in str(error.value)
    assert no_network == []


def test_extracted_archive_parent_is_read_through(tmp_path):
    """Pointing at the folder the archive was extracted into (holding cifar-10-batches-py/) works too."""
    written = write_directory(str(tmp_path / "parent" / "cifar-10-batches-py"))
    splits = cifar10.load_cifar10(directory=str(tmp_path / "parent"), validation_size=0)
    np.testing.assert_array_equal(splits["test"][1], written["test"][1])


# ---- splits ----
def test_validation_is_a_seeded_hold_out_of_the_training_batches(cifar_dir):
    directory, written = cifar_dir
    total = sum(TRAIN_SIZES)
    splits = cifar10.load_cifar10(directory=directory)               # default: 10% of the training images
    held_out = int(total * cifar10.DEFAULT_VALIDATION_SIZE)
    assert len(splits["validation"][0]) == held_out == 4 and len(splits["train"][0]) == total - held_out
    assert len(splits["test"][0]) == TEST_SIZE

    # exactly the images a default_rng(0) permutation picks, in file order
    expected = np.sort(np.random.default_rng(0).permutation(total)[:held_out])
    np.testing.assert_array_equal(splits["validation"][0], written["train"][0][expected] / np.float32(255.0))
    np.testing.assert_array_equal(splits["validation"][1], written["train"][1][expected])

    # disjoint, and together exactly the training batches; test apart
    train, validation, test = (set(digests(splits[s][0])) for s in ("train", "validation", "test"))
    assert not train & validation and not train & test and not validation & test
    assert train | validation == set(digests(written["train"][0] / np.float32(255.0)))
    assert test == set(digests(written["test"][0] / np.float32(255.0)))

    again = cifar10.load_cifar10(directory=directory, seed=0)
    np.testing.assert_array_equal(again["validation"][0], splits["validation"][0])
    other = cifar10.load_cifar10(directory=directory, seed=1)
    assert set(digests(other["validation"][0])) != validation
    np.testing.assert_array_equal(other["test"][0], splits["test"][0])  # the seed never touches the test split

    assert len(cifar10.load_cifar10(directory=directory, validation_size=10)["validation"][0]) == 10
    assert len(cifar10.load_cifar10(directory=directory, validation_size=0.5)["validation"][0]) == 22


@pytest.mark.parametrize("size", [1.0, -0.1, -1, 44, 100, True, "0.1", None])
def test_bad_validation_size(cifar_dir, size):
    directory, _ = cifar_dir
    with pytest.raises(ValueError, match="validation_size"):
        cifar10.load_cifar10(directory=directory, validation_size=size)


# ---- the label filter ----
def test_label_filter_keeps_and_remaps_in_the_given_order(cifar_dir):
    directory, written = cifar_dir
    full = cifar10.load_cifar10(directory=directory)
    chosen = (7, 2, 5)
    subset = cifar10.load_cifar10(directory=directory, labels=chosen)
    for split in ("train", "validation", "test"):
        x_full, y_full = full[split]
        x, y = subset[split]
        keep = np.isin(y_full, chosen)
        assert y.dtype == np.int32 and set(np.unique(y)) <= {0, 1, 2}
        np.testing.assert_array_equal(x, x_full[keep])               # the same images: the hold-out comes first
        np.testing.assert_array_equal(y, [chosen.index(label) for label in y_full[keep]])
    assert sum(len(subset[s][1]) for s in ("train", "validation")) == np.isin(written["train"][1], chosen).sum()
    assert cifar10.label_names(chosen) == ["horse", "bird", "dog"]
    assert cifar10.label_names() == list(cifar10.LABEL_NAMES)


@pytest.mark.parametrize("labels", [(), (1, 1), (10,), (-1, 2), ("cat",)])
def test_bad_label_filter(cifar_dir, labels):
    directory, _ = cifar_dir
    with pytest.raises(ValueError):
        cifar10.load_cifar10(directory=directory, labels=labels)


# ---- sources: auto, the Keras cache, the fast offline failure ----
def test_auto_offline_without_data_fails_fast_naming_both_places_and_the_flag(empty_home, no_network):
    started = time.perf_counter()
    with pytest.raises(datasets.Cifar10UnavailableError) as error:
        datasets.load_cifar10()
    assert time.perf_counter() - started < 5.0
    message = str(error.value)
    assert "--cifar_dir" in message
    assert str(empty_home / "tfds") in message                                           # the TFDS data_dir
    assert os.path.join(str(empty_home / "keras"), "datasets", "cifar-10-batches-py") in message  # the Keras cache
    assert no_network == [(cifar10.DOWNLOAD_HOST, cifar10.NETWORK_TIMEOUT_S)]


def test_tfds_source_offline_fails_fast(empty_home, tmp_path, no_network):
    started = time.perf_counter()
    with pytest.raises(datasets.Cifar10UnavailableError) as error:
        datasets.load_cifar10("tfds", data_dir=str(tmp_path / "tfds_elsewhere"))
    assert time.perf_counter() - started < 5.0
    message = str(error.value)
    assert str(tmp_path / "tfds_elsewhere") in message and "--cifar_dir" in message and "www.cs.toronto.edu" in message
    assert len(no_network) == 1


def test_directory_source_without_keras_cache_names_it(empty_home, no_network):
    with pytest.raises(datasets.Cifar10UnavailableError) as error:
        datasets.load_cifar10("directory")
    assert "Keras cache" in str(error.value) and "--cifar_dir" in str(error.value)
    assert no_network == []


@pytest.mark.parametrize("layout", ["keras_home", "keras3_target", "home"])
def test_auto_falls_back_to_the_keras_cache(empty_home, tmp_path, monkeypatch, no_network, layout):
    if layout == "home":  # no KERAS_HOME: ~/.keras
        monkeypatch.delenv("KERAS_HOME")
        cache = empty_home / ".keras" / "datasets" / "cifar-10-batches-py"
    elif layout == "keras3_target":  # where keras.datasets.cifar10 of Keras 3 (3.15 here) extracts it
        cache = empty_home / "keras" / "datasets" / "cifar-10-batches-py-target" / "cifar-10-batches-py"
    else:
        cache = empty_home / "keras" / "datasets" / "cifar-10-batches-py"
    written = write_directory(str(cache))
    assert cifar10.keras_cache_dir() == str(cache)
    splits = datasets.load_cifar10(validation_size=0)
    np.testing.assert_array_equal(splits["test"][1], written["test"][1])
    assert len(splits["train"][1]) == sum(TRAIN_SIZES)
    assert len(no_network) == 1  # TFDS was tried first (not prepared, no network), then the cache
    np.testing.assert_array_equal(datasets.load_cifar10("directory", validation_size=0)["test"][0],
                                  splits["test"][0])


def test_auto_prefers_a_prepared_tfds_copy_without_the_network(empty_home, monkeypatch, no_network):
    import tensorflow_datasets as tfds

    write_directory(str(empty_home / "keras" / "datasets" / "cifar-10-batches-py"))  # present, yet TFDS comes first
    monkeypatch.setattr(cifar10, "tfds_is_prepared", lambda *args, **kwargs: True)
    with tfds.testing.mock_data(num_examples=9):
        splits = datasets.load_cifar10(validation_size=3)
    assert [len(splits[s][1]) for s in ("train", "validation", "test")] == [6, 3, 9]
    assert no_network == []


def test_tfds_path_with_mock_data(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(cifar10, "network_available", lambda *args, **kwargs: True)
    with tfds.testing.mock_data(num_examples=20):
        splits = datasets.load_cifar10("tfds", data_dir=str(tmp_path / "tfds"), validation_size=5, seed=3)
        again = datasets.load_cifar10("tfds", data_dir=str(tmp_path / "tfds"), validation_size=5, seed=3)
        subset = datasets.load_cifar10("tfds", data_dir=str(tmp_path / "tfds"), validation_size=5, seed=3,
                                       labels=(0, 1, 2, 3, 4))
    assert [len(splits[s][1]) for s in ("train", "validation", "test")] == [15, 5, 20]
    for split, (x, y) in splits.items():
        assert x.shape[1:] == (32, 32, 3) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        assert y.dtype == np.int32 and np.all((0 <= y) & (y < 10))
        np.testing.assert_array_equal(again[split][0], x)
        keep = y < 5
        np.testing.assert_array_equal(subset[split][0], x[keep])
        np.testing.assert_array_equal(subset[split][1], y[keep])
    assert not set(digests(splits["train"][0])) & set(digests(splits["validation"][0]))


def test_unknown_source_and_misused_directory(cifar_dir):
    directory, _ = cifar_dir
    with pytest.raises(ValueError, match="'auto', 'tfds' or 'directory'"):
        datasets.load_cifar10("keras")
    with pytest.raises(ValueError, match="directory"):
        datasets.load_cifar10("tfds", directory=directory)


# ---- the shared real-image copy (../shared/data/cifar-10-batches-py) ----
@pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"no shared CIFAR-10 copy at {SHARED}")
def test_shared_real_cifar10_copy(tmp_path, monkeypatch, no_network):
    splits = datasets.load_cifar10(directory=SHARED)
    sizes = {split: len(y) for split, (x, y) in splits.items()}
    assert sizes["train"] + sizes["validation"] == 5085 and sizes["test"] == 1017
    assert sizes["validation"] == 508                        # int(0.1 * 5085)
    for x, y in splits.values():
        assert x.shape[1:] == (32, 32, 3) and x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
        assert 0.4 < x.mean() < 0.55                             # real photographs (CIFAR-10's mean is ~0.47)
        assert set(np.unique(y)) == set(range(10))
    train, validation, test = (set(digests(splits[s][0])) for s in ("train", "validation", "test"))
    assert not train & validation and not train & test and not validation & test
    assert cifar10.read_label_names(SHARED) == list(cifar10.LABEL_NAMES)

    # the layout agrees with Keras' own CIFAR reader (channels-first rows, transposed to NHWC)
    try:
        from keras.src.datasets.cifar import load_batch
    except ImportError:
        load_batch = None
    if load_batch is not None:
        data, labels = load_batch(os.path.join(SHARED, "test_batch"))
        np.testing.assert_array_equal(splits["test"][0], np.transpose(data, (0, 2, 3, 1)) / np.float32(255.0))
        np.testing.assert_array_equal(splits["test"][1], labels)

    # copied to the Keras cache location, it is what the default source finds offline
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    shutil.copytree(SHARED, tmp_path / "keras" / "datasets" / "cifar-10-batches-py")
    subset = datasets.load_cifar10(labels=(0, 1, 2, 3, 4))
    assert sum(len(subset[s][1]) for s in ("train", "validation")) == np.isin(
        np.concatenate([splits["train"][1], splits["validation"][1]]), range(5)).sum()
    assert set(np.unique(subset["test"][1])) == set(range(5))
