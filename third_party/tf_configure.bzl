"""Repository rule `tf_configure`: the installed TensorFlow, pybind11 and Python headers, found by running Python.

The pattern of TensorFlow's custom-op template (a configure step, no network): the rule runs the local Python
interpreter, asks `tf.sysconfig`, `pybind11` and `sysconfig` where things are, symlinks the directories into the
repository and writes two files there:

  BUILD            :tensorflow_framework  headers (tf.sysconfig.get_include()), the -D flags of
                                          tf.sysconfig.get_compile_flags() and libtensorflow_framework (the -L/-l of
                                          tf.sysconfig.get_link_flags())
                   :pybind11              pybind11's headers and Python's headers (for Python extension modules)
                   :python_headers        Python's headers alone
  build_defs.bzl   PYTHON_COPTS           the code-generation flags of Python's CFLAGS (sysconfig), with which setup.py
                                          (distutils) compiles every source first, e.g. -DNDEBUG -fwrapv -O3: its
                                          -g and -W flags are left out (no effect on the code)
                   TF_COPTS               tf.sysconfig compile flags other than -I/-D (e.g. --std=c++17)
                   KERNEL_COPTS           the CPU kernels' flags, as setup.py: -O3 -ffp-contract=fast -fno-math-errno
                                          and -march=$L2L_TF_MARCH (default native; "none": no -march flag)
                   PYTHON_EXTENSION_SUFFIX  e.g. ".cpython-311-x86_64-linux-gnu.so" (sysconfig EXT_SUFFIX)
                   TF_VERSION, PYBIND11_VERSION, PYTHON_BIN

The interpreter: $PYTHON_BIN_PATH (./configure pins it with --repo_env), else `python3` on PATH. The rule reruns when
PYTHON_BIN_PATH or L2L_TF_MARCH change (or with `bazel sync --configure`); after upgrading TensorFlow in the same
interpreter, run `bazel sync --configure` (or `bazel clean --expunge`).
"""

_PYTHON_BIN_PATH = "PYTHON_BIN_PATH"
_MARCH = "L2L_TF_MARCH"

# Printed as one JSON line after a marker (TensorFlow may log on import).
_QUERY = r"""
import json, os, sys, sysconfig
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
out = {"python": sys.executable, "python_include": sysconfig.get_paths()["include"],
       "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX") or "", "cflags": sysconfig.get_config_var("CFLAGS") or ""}
try:
    import pybind11
    out["pybind11_include"] = pybind11.get_include()
    out["pybind11_version"] = pybind11.__version__
except Exception as e:
    out["pybind11_error"] = "%s: %s" % (type(e).__name__, e)
try:
    import tensorflow as tf
    out["tf_version"] = tf.__version__
    out["tf_compile_flags"] = list(tf.sysconfig.get_compile_flags())
    out["tf_link_flags"] = list(tf.sysconfig.get_link_flags())
    out["tf_include"] = tf.sysconfig.get_include()
except Exception as e:
    out["tf_error"] = "%s: %s" % (type(e).__name__, e)
print("L2L_TF_CONFIGURE " + json.dumps(out))
"""

_MARKER = "L2L_TF_CONFIGURE "

def _fail(msg):
    fail("\n[tf_configure] %s\nRun ./configure (it pins the interpreter with --repo_env=PYTHON_BIN_PATH) or set " % msg +
         "PYTHON_BIN_PATH to a Python with TensorFlow and pybind11 installed (pip install -e \".[cpu,test,mnist]\").")

def _python(rctx):
    python = rctx.os.environ.get(_PYTHON_BIN_PATH, "").strip()
    if python:
        return python
    found = rctx.which("python3")
    if found == None:
        _fail("PYTHON_BIN_PATH is not set and there is no python3 on PATH.")
    return str(found)

def _query(rctx, python):
    result = rctx.execute([python, "-c", _QUERY], environment = {"TF_CPP_MIN_LOG_LEVEL": "3"}, timeout = 600)
    if result.return_code != 0:
        _fail("%s failed (exit %d):\n%s%s" % (python, result.return_code, result.stdout, result.stderr))
    for line in result.stdout.splitlines():
        if line.startswith(_MARKER):
            return json.decode(line[len(_MARKER):])
    _fail("%s printed no configuration:\n%s%s" % (python, result.stdout, result.stderr))
    return None

def _split_tf_flags(compile_flags, link_flags):
    """(include dir, defines, other compile flags, library dir, library file name) from tf.sysconfig's flags."""
    include = None
    defines = []
    copts = []
    for flag in compile_flags:
        if flag.startswith("-I"):
            include = flag[2:]
        elif flag.startswith("-D"):
            defines.append(flag[2:])
        else:
            copts.append(flag)
    lib_dir = None
    lib_name = None
    for flag in link_flags:
        if flag.startswith("-L"):
            lib_dir = flag[2:]
        elif flag.startswith("-l:"):
            lib_name = flag[3:]
        elif flag.startswith("-l"):
            lib_name = "lib%s.so" % flag[2:]
    return include, defines, copts, lib_dir, lib_name

def _kernel_copts(rctx):
    # The same as setup.py's _kernel_flags(): keep the two in step.
    march = rctx.os.environ.get(_MARCH, "native").strip()
    flags = ["-O3", "-ffp-contract=fast", "-fno-math-errno"]
    if march and march.lower() != "none":
        flags.append("-march=" + march)
    return flags

def _python_copts(cflags):
    # Python's CFLAGS as distutils passes them, less debug-info and warning flags (which do not change the code).
    return [f for f in cflags.split(" ") if f and not f.startswith("-g") and not f.startswith("-W")]

def _glob_includes(directory):
    return 'glob(["%s/**"], exclude = ["**/*.so", "**/*.so.*", "**/*.a", "**/*.pyc", "**/BUILD", "**/BUILD.bazel", "**/WORKSPACE"])' % directory

def _tf_configure_impl(rctx):
    python = _python(rctx)
    cfg = _query(rctx, python)
    if "tf_error" in cfg:
        _fail("%s cannot import TensorFlow (%s)." % (cfg["python"], cfg["tf_error"]))
    if "pybind11_error" in cfg:
        _fail("%s cannot import pybind11 (%s)." % (cfg["python"], cfg["pybind11_error"]))
    if not cfg["ext_suffix"]:
        _fail("%s reports no EXT_SUFFIX (sysconfig)." % cfg["python"])

    include, defines, tf_copts, lib_dir, lib_name = _split_tf_flags(cfg["tf_compile_flags"], cfg["tf_link_flags"])
    if include == None:
        include = cfg["tf_include"]
    if lib_dir == None or lib_name == None:
        _fail("cannot read the TensorFlow library from tf.sysconfig.get_link_flags() = %s" % cfg["tf_link_flags"])
    library = rctx.path(lib_dir + "/" + lib_name)
    if not library.exists:
        _fail("%s does not exist (tf.sysconfig.get_link_flags() = %s)" % (library, cfg["tf_link_flags"]))

    rctx.symlink(include, "tensorflow_include")
    rctx.symlink(library, "tensorflow_lib/" + lib_name)
    rctx.symlink(cfg["python_include"], "python_include")
    rctx.symlink(cfg["pybind11_include"], "pybind11_include")

    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", """# Generated by @l2l_tf//third_party:tf_configure.bzl from {python}: do not edit.
load("@rules_cc//cc:defs.bzl", "cc_import", "cc_library")

package(default_visibility = ["//visibility:public"])

# TensorFlow {tf_version}: tf.sysconfig.get_include() = {include}
cc_library(
    name = "tensorflow_headers",
    hdrs = {tf_hdrs},
    defines = {defines},
    includes = ["tensorflow_include"],
)

# tf.sysconfig.get_link_flags() = {link_flags}
cc_import(
    name = "tensorflow_framework_library",
    shared_library = "tensorflow_lib/{lib_name}",
)

cc_library(
    name = "tensorflow_framework",
    deps = [
        ":tensorflow_framework_library",
        ":tensorflow_headers",
    ],
)

# sysconfig.get_paths()["include"] = {python_include}
cc_library(
    name = "python_headers",
    hdrs = {py_hdrs},
    includes = ["python_include"],
)

# pybind11 {pybind11_version}: pybind11.get_include() = {pybind11_include}
cc_library(
    name = "pybind11",
    hdrs = {pybind11_hdrs},
    includes = ["pybind11_include"],
    deps = [":python_headers"],
)
""".format(
        python = cfg["python"],
        tf_version = cfg["tf_version"],
        include = include,
        tf_hdrs = _glob_includes("tensorflow_include"),
        defines = repr(defines),
        link_flags = " ".join(cfg["tf_link_flags"]),
        lib_name = lib_name,
        python_include = cfg["python_include"],
        py_hdrs = _glob_includes("python_include"),
        pybind11_version = cfg["pybind11_version"],
        pybind11_include = cfg["pybind11_include"],
        pybind11_hdrs = _glob_includes("pybind11_include"),
    ))

    rctx.file("build_defs.bzl", '''"""Generated by @l2l_tf//third_party:tf_configure.bzl: do not edit."""

PYTHON_BIN = {python}
TF_VERSION = {tf_version}
PYBIND11_VERSION = {pybind11_version}

# Python's CFLAGS ({cflags}) less -g and -W flags: setup.py (distutils) compiles every source with them first;
# -fwrapv changes the kernels' code (and last bits of their results), so the Bazel build uses them too.
PYTHON_COPTS = {python_copts}

# tf.sysconfig.get_compile_flags() other than -I (the headers of :tensorflow_framework) and -D (its defines).
TF_COPTS = {tf_copts}

# The CPU kernels' flags, as setup.py's (L2L_TF_MARCH={march}).
KERNEL_COPTS = {kernel_copts}

# The file name suffix of Python extension modules (sysconfig EXT_SUFFIX).
PYTHON_EXTENSION_SUFFIX = {ext_suffix}
'''.format(
        python = repr(cfg["python"]),
        tf_version = repr(cfg["tf_version"]),
        pybind11_version = repr(cfg["pybind11_version"]),
        cflags = cfg["cflags"],
        python_copts = repr(_python_copts(cfg["cflags"])),
        tf_copts = repr(tf_copts),
        march = rctx.os.environ.get(_MARCH, "native (default)"),
        kernel_copts = repr(_kernel_copts(rctx)),
        ext_suffix = repr(cfg["ext_suffix"]),
    ))

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = [_PYTHON_BIN_PATH, _MARCH],
    configure = True,
    doc = "The installed TensorFlow, pybind11 and Python headers (see the module docstring).",
)
