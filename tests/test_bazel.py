"""The Bazel build (WORKSPACE, BUILD files, .bazelrc, ./configure; README "Bazel"), end to end.

Skipped when `bazel` is not on PATH: setup.py is the default build and nothing else in this suite needs Bazel. The files
Bazel reads are copied into a fresh directory (as a clone has them: no bazel-* links, no .bazelrc.user). There
./configure runs (with this interpreter), then `bazel --batch test --config=offline //csrc/...` with its own output
root: no network (the offline stand-ins), no Bazel server left running (--batch). That builds the CPU kernels, the op
library and the pybind11 module and runs //csrc:kernels_test. Then this suite's kernel and fused-op tests run in a
subprocess against the Bazel-built files through L2L_TF_OPS_DIR, after a check that those are the files l2l_tf loads.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAZEL = shutil.which("bazel")
# What Bazel reads: everything else in the checkout is irrelevant to it.
BAZEL_FILES = ["WORKSPACE", "BUILD", ".bazelrc", "configure"]
BAZEL_DIRS = ["third_party", "csrc"]
OPS_DIR_TESTS = ["tests/test_fused_op.py", "tests/test_kernels_cpu.py"]

needs_bazel = pytest.mark.skipif(
    BAZEL is None, reason="bazel is not on PATH (Debian: apt-get install -y bazel-bootstrap); setup.py is the default "
                          "build, the Bazel build is optional")


def _run(cmd, cwd, env, timeout):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def _fresh_tree(dest):
    os.makedirs(dest)
    for name in BAZEL_FILES:
        shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))
    for name in BAZEL_DIRS:
        shutil.copytree(os.path.join(ROOT, name), os.path.join(dest, name),
                        ignore=shutil.ignore_patterns("bazel-*", "__pycache__", "*.o", "*.so"))
    return dest


@needs_bazel
def test_bazel_builds_tests_and_the_python_tests_pass_against_its_libraries(tmp_path):
    tree = _fresh_tree(str(tmp_path / "l2l_tf"))
    env = {k: v for k, v in os.environ.items() if k not in ("L2L_TF_OPS_DIR", "PYTHON_BIN_PATH", "L2L_TF_MARCH")}

    rc, out = _run(["./configure"], tree, dict(env, PYTHON_BIN_PATH=sys.executable), 300)
    assert rc == 0, out
    with open(os.path.join(tree, ".bazelrc.user"), encoding="utf-8") as f:
        rc_user = f.read()
    for repo in ("rules_cc", "rules_java", "remote_coverage_tools"):
        assert f"build:offline --override_repository={repo}={os.path.realpath(tree)}/third_party/bazel_offline/{repo}" \
            in rc_user, rc_user
    assert "--repo_env=PYTHON_BIN_PATH=" in rc_user

    # One command builds every target under //csrc and runs the C++ test, without network.
    rc, out = _run([BAZEL, "--batch", f"--output_user_root={tmp_path / 'bazel_root'}", "test", "--config=offline",
                    "//csrc/..."], tree, env, 1800)
    log = os.path.join(tree, "bazel-testlogs", "csrc", "kernels_test", "test.log")
    test_log = open(log, encoding="utf-8", errors="replace").read() if os.path.exists(log) else "(no test.log)"
    assert rc == 0, f"{out[-6000:]}\n--- kernels_test log ---\n{test_log[-6000:]}"
    assert "//csrc:kernels_test" in out and "PASSED" in out, out[-3000:]
    assert "PASSED" in test_log and "FAIL" not in test_log, test_log[-3000:]

    # The same file names as setup.py's.
    ops_dir = os.path.join(tree, "bazel-bin", "csrc")
    op_library = os.path.join(ops_dir, "_lstm_step_ops.so")
    kernels = os.path.join(ops_dir, "_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    assert os.path.isfile(op_library) and os.path.isfile(kernels), os.listdir(ops_dir)

    # L2L_TF_OPS_DIR: l2l_tf loads both from there.
    ops_env = dict(env, L2L_TF_OPS_DIR=ops_dir, TF_CPP_MIN_LOG_LEVEL="2")
    code = ("from l2l_tf.ops import fused, library\n"
            "assert fused.available(), fused.load_error()\n"
            "print('op', fused.library_path())\n"
            "print('kernels', library.load_kernels().__file__)\n")
    rc, out = _run([sys.executable, "-c", code], ROOT, ops_env, 300)
    assert rc == 0, out
    assert f"op {op_library}" in out and f"kernels {kernels}" in out, out

    # The kernel and fused-op tests against the Bazel-built libraries.
    rc, out = _run([sys.executable, "-m", "pytest", *OPS_DIR_TESTS, "-q", "-p", "no:cacheprovider", "-rs"], ROOT,
                   ops_env, 1800)
    assert rc == 0, out[-6000:]
    assert "not built" not in out, out[-6000:]  # no test skipped for want of a library


def test_ops_dir_without_the_libraries_is_an_error_naming_it(tmp_path):
    # No fallback to the package's copies: a directory without the files fails loudly, naming the directory.
    env = dict(os.environ, L2L_TF_OPS_DIR=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="2")
    for code in ("from l2l_tf.ops import fused; fused.available()",
                 "from l2l_tf.ops import library; library.load_kernels()"):
        rc, out = _run([sys.executable, "-c", code], ROOT, env, 300)
        assert rc != 0 and "OpsDirError" in out and f"L2L_TF_OPS_DIR={tmp_path}" in out, out
