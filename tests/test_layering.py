"""The layers import only the one below: kernels (no TensorFlow) → ops (one public switch) → library; the GPU
check script stands alone (no TensorFlow, no test files)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sources(directory, suffixes=(".py",)):
    for base, _, files in os.walk(os.path.join(ROOT, directory)):
        for name in files:
            if name.endswith(suffixes):
                path = os.path.join(base, name)
                yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()


def test_kernels_do_not_include_tensorflow():
    for path, text in sources("csrc", (".h", ".cc", ".cu")):
        if os.path.basename(path) == "tf_op.cc":
            continue  # the TF op itself is the ops layer's C++ half
        assert "tensorflow" not in text, path


def test_library_uses_only_the_public_ops_switch():
    """Outside l2l_tf/ops no module reaches into the fused op or the reference (ops.fused, ops.reference)."""
    private = re.compile(r"ops\.(fused|reference)\b|from l2l_tf\.ops(\.(fused|reference)| import .*\b(fused|reference)\b)")
    for path, text in sources("l2l_tf"):
        if path.startswith(os.path.join("l2l_tf", "ops")):
            continue
        assert not private.search(text), (path, private.search(text).group(0))


def test_ops_layer_imports_no_library_package():
    library = re.compile(r"from l2l_tf(\.(rules|problems|training|datasets|keras_optimizer|evaluation)| import)")
    for path, text in sources(os.path.join("l2l_tf", "ops")):
        assert not library.search(text), path


def test_gpu_check_needs_no_tensorflow_and_no_test_file():
    text = open(os.path.join(ROOT, "tools", "gpu_check.py"), encoding="utf-8").read()
    assert "tests" + os.sep not in text and '"tests"' not in text
    assert not re.search(r"^\s*(import|from) (tensorflow|l2l_tf)\b", text, re.M)
    modules = [name for name in os.listdir(os.path.join(ROOT, "l2l_tf")) if name.startswith("_kernels")]
    if not modules:
        pytest.skip("the pybind11 module is not built")
    # The CPU self-test with TensorFlow and l2l_tf made unimportable: the script must not need them.
    code = ("import sys, runpy\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('tensorflow', 'l2l_tf'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            f"sys.argv = ['gpu_check.py', '--cpu-selftest', '--module-dir', {os.path.join(ROOT, 'l2l_tf')!r}]\n"
            f"runpy.run_path({os.path.join(ROOT, 'tools', 'gpu_check.py')!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
