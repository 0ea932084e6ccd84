"""Where l2l_tf finds its two compiled extensions, and `L2L_TF_OPS_DIR`.

    l2l_tf/_lstm_step_ops.so            the TensorFlow op library (csrc/tf_op.cc), loaded by `l2l_tf.ops.fused`
    l2l_tf/_kernels<EXT_SUFFIX>         the pybind11 module `l2l_tf._kernels` (csrc/pybind_module.cc), e.g.
                                        _kernels.cpython-311-x86_64-linux-gnu.so; `load_kernels()`

`pip install -e .` (setup.py) builds both into the package directory, where they are found by default. With the
environment variable L2L_TF_OPS_DIR set to a directory (e.g. the Bazel outputs, `bazel-bin/csrc`; a relative path is
taken from the current directory), both are loaded from that directory instead, under the same file names and the
same module name. There is no fallback then: a file missing from that directory, or one that does not load, is an
`OpsDirError` naming the directory (never the package's copy instead).

This module imports neither TensorFlow nor the extensions until asked.
"""
import importlib
import importlib.machinery
import importlib.util
import os
import sys

ENV_VAR = "L2L_TF_OPS_DIR"
OP_LIBRARY = "_lstm_step_ops.so"
KERNELS_MODULE = "l2l_tf._kernels"


class OpsDirError(ImportError):
    """L2L_TF_OPS_DIR is set, and the extension asked for is not there or does not load."""


def package_dir():
    """The `l2l_tf` package directory, where setup.py puts the extensions."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ops_dir():
    """The absolute directory named by L2L_TF_OPS_DIR, or None when it is unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip()
    return os.path.abspath(value) if value else None


def in_ops_dir(path):
    """True when L2L_TF_OPS_DIR is set and `path` lies directly in it."""
    directory = ops_dir()
    return directory is not None and os.path.dirname(os.path.abspath(path)) == directory


def _missing(what, looked_for):
    directory = ops_dir()
    where = "which does not exist" if not os.path.isdir(directory) else "which has no " + what
    return OpsDirError(
        f"{ENV_VAR}={directory}, {where} (looked for {', '.join(looked_for)}). Build it there (Bazel: "
        f"`bazel build //csrc:python_extensions`, then {ENV_VAR}=bazel-bin/csrc) or unset {ENV_VAR} to use the "
        f"copies setup.py builds into {package_dir()}.")


def op_library_path():
    """The op library's path: <L2L_TF_OPS_DIR>/_lstm_step_ops.so (OpsDirError when that file is missing) or, with
    L2L_TF_OPS_DIR unset, l2l_tf/_lstm_step_ops.so (which may not exist: the fused op is then unavailable)."""
    directory = ops_dir()
    if directory is None:
        return os.path.join(package_dir(), OP_LIBRARY)
    path = os.path.join(directory, OP_LIBRARY)
    if not os.path.isfile(path):
        raise _missing(OP_LIBRARY, [path])
    return path


def kernels_candidates(directory):
    """The file names the pybind11 module may have in `directory`, in the interpreter's order of preference."""
    return [os.path.join(directory, "_kernels" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]


def kernels_path():
    """The pybind11 module's file in L2L_TF_OPS_DIR (OpsDirError when there is none), or None when L2L_TF_OPS_DIR
    is unset (the module is then imported from the package as usual)."""
    directory = ops_dir()
    if directory is None:
        return None
    candidates = kernels_candidates(directory)
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise _missing("pybind11 module _kernels for this interpreter", candidates)


def load_kernels():
    """The pybind11 module `l2l_tf._kernels`: from L2L_TF_OPS_DIR when set (OpsDirError when it is missing there or
    fails to load), else from the package (ImportError when it is not built)."""
    path = kernels_path()
    if path is None:
        return importlib.import_module(KERNELS_MODULE)
    loaded = sys.modules.get(KERNELS_MODULE)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "")) == path:
        return loaded
    try:
        spec = importlib.util.spec_from_file_location(KERNELS_MODULE, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # ImportError (undefined symbol, wrong Python), OSError, ...
        raise OpsDirError(f"{ENV_VAR}={ops_dir()}: {path} failed to load: {type(e).__name__}: {e}") from e
    # Later imports of the module l2l_tf._kernels get this module too, unless the package's copy was imported before.
    sys.modules.setdefault(KERNELS_MODULE, module)
    return module
