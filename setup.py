"""Build of the l2l_tf package and its two native extensions.

  l2l_tf/_lstm_step_ops.so      TensorFlow custom ops (csrc/tf_op.cc + csrc/lstm_step_cpu.cc [+ CUDA]); compile and
                                link flags from tf.sysconfig only (plus optimisation flags).
  l2l_tf/_kernels*.so           pybind11 module (csrc/pybind_module.cc + csrc/lstm_step_cpu.cc [+ CUDA]).

Install: `pip install -e ".[cpu,test]"` (build isolation brings setuptools, pybind11 and tensorflow-cpu 2.21.0), or
`pip install -e . --no-build-isolation` with TensorFlow and pybind11 already installed.

Environment:
  L2L_TF_MARCH      ISA for the CPU kernels (default "native": -march=native, the vector ISA of the build machine,
                    which is right for a source build; use e.g. "x86-64-v3" for a binary that must run on other
                    AVX2 machines, or "none" to add no -march flag).
  L2L_TF_CUDA       "1": build the CUDA kernels (error if nvcc or csrc/lstm_step_cuda.cu is missing); "0": don't;
                    unset: build them when nvcc is found (PATH or $CUDA_HOME/bin) and csrc/lstm_step_cuda.cu exists.
  L2L_TF_CUDA_ARCHS compute capabilities for nvcc (default "80;86;89;90", PTX for the last one).
  L2L_TF_NVCC_FLAGS extra nvcc flags.
"""
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup

from pybind11.setup_helpers import Pybind11Extension
from pybind11.setup_helpers import build_ext as pybind11_build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
KERNEL_SOURCE = os.path.join(CSRC, "lstm_step_cpu.cc")
CUDA_SOURCE = os.path.join(CSRC, "lstm_step_cuda.cu")
PYBIND_CUDA_SOURCE = os.path.join(CSRC, "pybind_cuda.cc")
OPS_NAME = "l2l_tf._lstm_step_ops"


def _note(msg):
    print(f"l2l_tf setup: {msg}", file=sys.stderr, flush=True)


def _kernel_flags():
    march = os.environ.get("L2L_TF_MARCH", "native").strip()
    flags = ["-O3", "-ffp-contract=fast", "-fno-math-errno"]
    if march and march.lower() != "none":
        flags.append(f"-march={march}")
    return flags


def _find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
                nvcc = os.path.join(home, "bin", "nvcc")
                break
    return nvcc


def _cuda_home(nvcc):
    """The toolkit directory (with include/cuda_runtime.h): $CUDA_HOME, the nvcc's own, or `nvcc` asked itself
    (nvcc may be a wrapper script elsewhere on PATH)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                             capture_output=True, text=True, timeout=60).stderr
        for line in out.splitlines():
            if "TOP=" in line:
                candidates.append(line.split("TOP=", 1)[1].strip().strip('"'))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.realpath(home)
    raise RuntimeError(f"cannot find the CUDA toolkit of {nvcc} (no include/cuda_runtime.h); set CUDA_HOME")


def _cuda_config():
    """None (CPU-only build) or dict(nvcc, home, include, lib)."""
    mode = os.environ.get("L2L_TF_CUDA", "").strip()
    if mode == "0":
        _note("L2L_TF_CUDA=0: building the CPU kernels only")
        return None
    forced = mode == "1"
    nvcc = _find_nvcc()
    have_source = os.path.exists(os.path.join(ROOT, CUDA_SOURCE))
    if nvcc is None or not have_source:
        why = "nvcc not found (PATH, $CUDA_HOME/bin)" if nvcc is None else f"{CUDA_SOURCE} does not exist yet"
        if forced:
            raise RuntimeError(f"L2L_TF_CUDA=1 but {why}: cannot build the CUDA kernels")
        _note(f"{why}: building the CPU kernels only (set L2L_TF_CUDA=1 to require CUDA)")
        return None
    home = _cuda_home(nvcc)
    include = os.path.join(home, "include")
    lib = next((os.path.join(home, d) for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))
                if os.path.exists(os.path.join(home, d, "libcudart_static.a"))), os.path.join(home, "lib64"))
    _note(f"building the CUDA kernels with {nvcc}")
    return {"nvcc": nvcc, "home": home, "include": include, "lib": lib, "forced": forced}


def _tf_flags():
    """(compile flags, link flags, include dir) from tf.sysconfig, or None when TensorFlow is not importable."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as e:
        _note(f"TensorFlow is not importable ({e}): the op library {OPS_NAME} will NOT be built "
              "(l2l_tf falls back to its pure-TensorFlow implementation)")
        return None
    return tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags(), tf.sysconfig.get_include()


class BuildExt(pybind11_build_ext):
    """Compiles the CPU kernel source with the kernel flags and the .cu with nvcc, then links them in."""

    def initialize_options(self):
        super().initialize_options()
        self._object_cache = {}

    def get_ext_filename(self, ext_name):
        # The op library is a plain shared library for tf.load_op_library (no Python-module suffix). distutils
        # asks with the full dotted name and with its last component.
        if ext_name == OPS_NAME:
            return os.path.join(*OPS_NAME.split(".")) + ".so"
        if ext_name == OPS_NAME.rsplit(".", 1)[1]:
            return ext_name + ".so"
        return super().get_ext_filename(ext_name)

    def _compile_kernel(self, ext):
        key = ("kernel", tuple(ext.kernel_args))
        if key not in self._object_cache:
            out_dir = os.path.join(self.build_temp, "kernel_" + str(len(self._object_cache)))
            objects = self.compiler.compile([KERNEL_SOURCE], output_dir=out_dir, include_dirs=[CSRC],
                                            extra_postargs=ext.kernel_args)
            self._object_cache[key] = objects
        return self._object_cache[key]

    def _compile_cuda(self, cuda):
        key = ("cuda",)
        if key not in self._object_cache:
            out_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(out_dir, exist_ok=True)
            obj = os.path.join(out_dir, "lstm_step_cuda.o")
            archs = [a.strip() for a in os.environ.get("L2L_TF_CUDA_ARCHS", "80;86;89;90").replace(",", ";").split(";")
                     if a.strip()]
            gencode = []
            for i, a in enumerate(archs):
                code = f"[sm_{a},compute_{a}]" if i == len(archs) - 1 else f"sm_{a}"
                gencode.append(f"-gencode=arch=compute_{a},code={code}")
            cmd = [cuda["nvcc"], "-x", "cu", "-c", CUDA_SOURCE, "-o", obj, "-O3", "-std=c++17",
                   "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", f"-I{CSRC}", *gencode,
                   *shlex.split(os.environ.get("L2L_TF_NVCC_FLAGS", ""))]
            _note(" ".join(cmd))
            subprocess.check_call(cmd, cwd=ROOT)
            self._object_cache[key] = [obj]
        return self._object_cache[key]

    def run(self):
        cuda = next((ext.cuda for ext in self.extensions if getattr(ext, "cuda", None)), None)
        if cuda and not cuda["forced"]:
            # Auto-detected CUDA: if the CUDA sources do not compile here, build the CPU-only libraries rather
            # than failing the install (L2L_TF_CUDA=1 makes it an error instead).
            try:
                self._compile_cuda(cuda)
            except (subprocess.CalledProcessError, OSError) as e:
                _note(f"WARNING: compiling {CUDA_SOURCE} failed ({e}); building the CPU kernels only")
                cpu_only = {ext.name: ext for ext in _extensions(None)}
                for ext in self.extensions:  # reconfigure in place (setuptools has annotated these objects)
                    ext.__dict__.update({k: v for k, v in vars(cpu_only[ext.name]).items()
                                         if not k.startswith("_")})
        super().run()

    def build_extension(self, ext):
        objects = list(self._compile_kernel(ext))
        if getattr(ext, "cuda", None):
            objects += self._compile_cuda(ext.cuda)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def _cuda_link_args(cuda):
    # Static cudart: the libraries load (and the CPU kernels work) on machines without the CUDA runtime.
    return [f"-L{cuda['lib']}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]


def _ops_extension(cuda, tf_flags):
    compile_flags, link_flags, tf_include = tf_flags
    args = list(compile_flags) + ["-O2", "-Wno-deprecated-declarations", "-Wno-sign-compare"]
    ext = Extension(OPS_NAME, sources=[os.path.join(CSRC, "tf_op.cc")], include_dirs=[CSRC],
                    extra_compile_args=args, extra_link_args=list(link_flags), language="c++")
    # TF's -D_GLIBCXX_USE_CXX11_ABI / --std flags apply to the kernel object of this library too.
    ext.kernel_args = list(compile_flags) + _kernel_flags()
    ext.cuda = cuda
    if cuda:
        # The host code compiled with GOOGLE_CUDA includes CUDA headers; TF headers look for some of them under
        # third_party/gpus/cuda/include, which the CPU wheel does not ship: point that at the toolkit.
        incs = [cuda["include"]]
        if not os.path.exists(os.path.join(tf_include, "third_party", "gpus", "cuda", "include")):
            shim = os.path.join(ROOT, "build", "cuda_include_shim")
            link = os.path.join(shim, "third_party", "gpus", "cuda", "include")
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if os.path.islink(link) and os.readlink(link) != cuda["include"]:
                os.remove(link)
            if not os.path.lexists(link):
                os.symlink(cuda["include"], link)
            incs.append(shim)
        ext.include_dirs += incs
        ext.extra_compile_args += ["-DGOOGLE_CUDA=1"]
        ext.extra_link_args += _cuda_link_args(cuda)
    return ext


def _pybind_extension(cuda):
    sources = [os.path.join(CSRC, "pybind_module.cc")]
    ext = Pybind11Extension("l2l_tf._kernels", sources=sources, include_dirs=[CSRC], cxx_std=17,
                            extra_compile_args=["-O2"])
    ext.kernel_args = ["-std=c++17"] + _kernel_flags()
    ext.cuda = None
    if cuda:
        if os.path.exists(os.path.join(ROOT, PYBIND_CUDA_SOURCE)):
            ext.cuda = cuda
            ext.sources.append(PYBIND_CUDA_SOURCE)
            ext.include_dirs.append(cuda["include"])
            ext.define_macros.append(("L2L_WITH_CUDA", "1"))
            ext.extra_link_args += _cuda_link_args(cuda)
        else:
            _note(f"{PYBIND_CUDA_SOURCE} does not exist yet: the pybind11 module gets no CUDA bindings")
    return ext


def _extensions(cuda):
    exts = [_pybind_extension(cuda)]
    tf_flags = _tf_flags()
    if tf_flags is not None:
        exts.insert(0, _ops_extension(cuda, tf_flags))
    return exts


setup(
    packages=find_packages(include=["l2l_tf", "l2l_tf.*"]),
    package_data={"l2l_tf": ["pretrained/*.npz"]},
    include_package_data=True,
    ext_modules=_extensions(_cuda_config()),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
