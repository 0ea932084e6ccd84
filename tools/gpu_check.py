#!/usr/bin/env python3
"""Correctness and timing of the CUDA kernels of the LSTM step (csrc/lstm_step_cuda.cu) on a GPU machine.

Run through tools/gpu_check.sh, which builds the pybind11 module `_kernels` (CPU + CUDA kernels) into a
temporary directory and passes it here with --module-dir. Needs NumPy and CuPy; PyTorch and JAX are optional
(their rows are skipped when missing or failing). Never imports TensorFlow or the l2l_tf package: the float64
reference and φ's tree are tools/lstm_step_numpy.py (imported from this script's directory), and the kernels' flat
φ layout is l2l_tf/ops/layout.py, imported as the stand-alone module `layout` (it needs only NumPy) with l2l_tf/ops
on sys.path for that one import, so the package's __init__ (TensorFlow) never runs.

  (a) correctness: CUDA fp32 / tf32 forward and CUDA backward vs the CPU kernels (and vs float64 NumPy),
      random inputs with zero, tiny, huge and ±inf gradients (±inf act as ±FLT_MAX, d_grad 0 there: lstm_step.h),
      the 3 preprocess modes, hidden 20/20 and 7/5, N with and without a multiple-of-4 / multiple-of-32 size,
      outputs poisoned with NaN before each call, guard zones after each output checked for stray writes, in-place
      calls (new_state = state); NaN gradients: the forward's NaN pattern equals the CPU kernel's (NaN propagates).
  (b) timing (CUDA events, median of --reps after warm-up): our forward (fp32, tf32 and its tile variants)
      and backward at N = 1e6 and 1e7, a JAX jit and a torch.compile version of the same step ([S, N] state),
      and the memory floor: 652 bytes per coordinate (the forward's compulsory traffic, see BYTES_FWD; the same
      floor as in the GPU reference notes kept outside this repository, ../shared/reference/performance.md) at the
      device-to-device copy bandwidth measured in the same run.
Results also go to $OUT/gpu_check.json when OUT is set (or --json PATH).

Without a GPU: `--cpu-selftest --module-dir DIR` checks the CPU kernels of a built module against the float64
reference (no CuPy needed); `--help` needs nothing.
"""
import argparse
import glob
import importlib.util
import json
import math
import os
import re
import sys
import time

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX shares the GPU with CuPy and torch here

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
OPS = os.path.join(ROOT, "l2l_tf", "ops")
if TOOLS not in sys.path:  # sys.path[0] when run as a script; added in case it is not
    sys.path.insert(0, TOOLS)
import lstm_step_numpy  # noqa: E402

# l2l_tf/ops/layout.py as the top-level module `layout`: importing it as part of the l2l_tf package would run the
# package's __init__ (TensorFlow). l2l_tf/ops is on sys.path only for this import, so that its other modules
# (config.py, ...) cannot shadow anything imported later.
sys.path.insert(0, OPS)
try:
    import layout  # noqa: E402
finally:
    sys.path.remove(OPS)
assert os.path.dirname(os.path.abspath(layout.__file__)) == OPS, layout.__file__

# Per coordinate (hidden 20/20, 80 state rows): read grad, theta and 80 state floats, write theta and 80 state floats:
# 4·(1 + 1 + 80) + 4·(1 + 80) = 652 bytes.
BYTES_FWD = 4 * (1 + 1 + 80) + 4 * (1 + 80)
BYTES_BWD = 4 * (1 + 80 + 1 + 80) + 4 * (1 + 80)  # read grad, state, d_update, d_new_state; write d_grad, d_state
CONFIGS = [  # hidden1, hidden2, preprocess, param
    (20, 20, "none", 10.0), (20, 20, "paper", 10.0), (20, 20, "clamped", 5.0),
    (7, 5, "none", 10.0), (7, 5, "paper", 10.0), (7, 5, "clamped", 5.0),
]
TF32_VARIANTS = [  # (m_tiles, stages, act, warps per block; 0 = as many as fit): the first is the default kTF32
    (2, 2, 1, 0), (2, 2, 0, 0), (2, 3, 0, 0), (1, 2, 1, 0), (2, 2, 1, 6), (1, 2, 1, 8),
]
TOL = {"fp32": 1e-5, "tf32": 5e-3, "bwd": 1e-4}
FLT_MAX = float(np.finfo(np.float32).max)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module-dir", help="directory holding the built _kernels*.so")
    p.add_argument("--sizes", default="1e6,1e7", help="N values for the timing (comma separated)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-timing", action="store_true", help="correctness only")
    p.add_argument("--no-frameworks", action="store_true", help="skip the JAX and torch.compile rows")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="skip the remaining optional sections once this many seconds have passed")
    p.add_argument("--json", default=None, help="where to write the results (default $OUT/gpu_check.json)")
    p.add_argument("--cpu-selftest", action="store_true", help="no GPU: check forward_cpu/backward_cpu vs NumPy")
    return p.parse_args(argv)


T0 = time.time()


def elapsed():
    return time.time() - T0


def log(*a):
    print(f"[{elapsed():6.1f}s]", *a, flush=True)


def load_kernels(module_dir):
    paths = sorted(glob.glob(os.path.join(module_dir, "_kernels*.so")))
    if not paths:
        sys.exit(f"no _kernels*.so in {module_dir}")
    spec = importlib.util.spec_from_file_location("_kernels", paths[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_reference():
    """The float64 reference and φ-tree helpers (tools/lstm_step_numpy.py); `reference_step` runs it on a flat φ."""
    return lstm_step_numpy


def reference_step(phi, grad, state, scale, h1, h2, pre, param):
    """The float64 reference step on a flat float32 φ (the kernels' argument), through `layout.unflatten`."""
    tree = layout.unflatten(np.asarray(phi), h1, h2, layout.input_size(pre))
    with np.errstate(over="ignore"):  # exp overflow in the float64 sigmoid of huge gates: exact limits
        return lstm_step_numpy.lstm_step_np(tree, grad, state, scale, h1, h2, pre, param)


def rel_err(got, ref):
    """max |got - ref| / max |ref| (inf when got has a non-finite value where ref is finite)."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return float("inf")
    fin = np.isfinite(ref)
    if not np.all(np.isfinite(got[fin])):
        return float("inf")
    scale = np.max(np.abs(ref[fin])) if fin.any() else 0.0
    err = np.max(np.abs(got[fin] - ref[fin])) if fin.any() else 0.0
    return float(err / scale) if scale > 0 else float(err)


def make_inputs(rng, ref, h1, h2, pre, n):
    """Flat float32 φ (a random tree, flattened), gradients with special values scattered through N, state."""
    S = 2 * (h1 + h2)
    phi = layout.flatten(ref.random_phi_tree(rng, h1, h2, pre, std=0.3))
    g = rng.normal(size=n) * 10.0 ** rng.uniform(-8, 2, n)
    kind = rng.uniform(size=n)
    g[kind < 0.05] = 0.0
    tiny = (kind >= 0.05) & (kind < 0.10)
    g[tiny] = rng.choice([1e-30, -1e-30, 1e-40, -3e-42, 1e-45], tiny.sum())
    huge = (kind >= 0.10) & (kind < 0.15)
    # With preprocess "none" the raw gradient enters the gates: astronomically large values make d_phi's x column
    # (dz * g with dz ~ sigmoid' near saturation, where 1 - sigmoid has 1-ulp-of-1 noise) ill-conditioned.
    big = [1e3, -1e3, 1e4, -3e4] if pre == "none" else [1e30, -1e30, 3e38, -1e20]
    g[huge] = rng.choice(big, huge.sum())
    # ±inf act as ±FLT_MAX (lstm_step.h): their gates saturate, the sigmoids to exactly 0 or 1 in every implementation
    # (the CPU kernels flush below -80), so d_phi stays well conditioned even for "none".
    infinite = (kind >= 0.15) & (kind < 0.17)
    g[infinite] = rng.choice([np.inf, -np.inf], infinite.sum())
    grad = g.astype(np.float32)
    state = np.empty((S, n), np.float32)
    state[:h1] = rng.uniform(-1, 1, (h1, n))
    state[h1:2 * h1] = rng.normal(0, 2, (h1, n))
    state[2 * h1:2 * h1 + h2] = rng.uniform(-1, 1, (h2, n))
    state[2 * h1 + h2:] = rng.normal(0, 2, (h2, n))
    return phi, grad, state


# ---------------------------------------------------------------------------------------------------------
# CPU self-test (no GPU)

def cpu_selftest(K, ref):
    rng = np.random.default_rng(0)
    worst = 0.0
    for h1, h2, pre, param in CONFIGS:
        P = layout.num_params(h1, h2, layout.input_size(pre))
        if K.num_params(h1, h2, pre) != P:
            print(f"num_params {h1}/{h2} {pre}: module {K.num_params(h1, h2, pre)}, layout.py {P}: FAIL")
            return False
        n = 1000
        phi, grad, state = make_inputs(rng, ref, h1, h2, pre, n)
        upd, ns = K.forward_cpu(phi, grad, state, 0.1, h1, h2, pre, param)
        u64, s64 = reference_step(phi, grad, state, 0.1, h1, h2, pre, param)
        e = max(rel_err(upd, u64), rel_err(ns, s64))
        worst = max(worst, e)
        print(f"forward_cpu {h1}/{h2} {pre:8s} vs float64: {e:.2e}")
    print("worst", worst, "OK" if worst < TOL["fp32"] else "FAIL")
    return worst < TOL["fp32"]


# ---------------------------------------------------------------------------------------------------------
# GPU helpers (CuPy)

class Dev:
    """Device buffers with a NaN-poisoned guard zone after the payload (checks stray writes)."""

    GUARD = 64  # floats

    def __init__(self, cp):
        self.cp = cp

    def upload(self, a):
        return self.cp.asarray(np.ascontiguousarray(a, np.float32))

    def out(self, shape):
        size = int(np.prod(shape))
        buf = self.cp.empty(size + self.GUARD, np.float32)
        self.cp.cuda.runtime.memset(buf.data.ptr, 0xFF, buf.nbytes)  # all-ones bits: NaN
        return buf

    def view(self, buf, shape):
        return buf[: int(np.prod(shape))].reshape(shape)

    def guard_ok(self, buf):
        tail = self.cp.asnumpy(buf[-self.GUARD:])
        return bool(np.all(tail.view(np.uint32) == 0xFFFFFFFF))


def correctness(K, ref, cp, results):
    dev = Dev(cp)
    rng = np.random.default_rng(1234)
    rows = []
    all_ok = True
    cases = []
    for idx, (h1, h2, pre, param) in enumerate(CONFIGS):
        for n in ((8192, 4099) if idx % 2 == 0 else (4099, 8192)):
            cases.append((h1, h2, pre, param, n))
    cases.append((20, 20, "paper", 10.0, 5))  # fewer coordinates than one warp tile
    cases.append((20, 20, "paper", 10.0, 100003))
    for h1, h2, pre, param, n in cases:
        S = 2 * (h1 + h2)
        phi, grad, state = make_inputs(rng, ref, h1, h2, pre, n)
        scale = 0.1
        u_cpu, s_cpu = K.forward_cpu(phi, grad, state, scale, h1, h2, pre, param)
        if n <= 10000:
            u64, s64 = reference_step(phi, grad, state, scale, h1, h2, pre, param)
        else:
            u64 = s64 = None
        d_phi, d_grad, d_state = dev.upload(phi), dev.upload(grad), dev.upload(state)
        name = f"{h1}/{h2} {pre}"
        for math_mode in ("fp32", "tf32"):
            bu, bs = dev.out((n,)), dev.out((S, n))
            try:
                K.forward_cuda(d_phi.data.ptr, d_grad.data.ptr, d_state.data.ptr, scale, n, bu.data.ptr,
                               bs.data.ptr, h1, h2, pre, param, math_mode)
                cp.cuda.Device().synchronize()
                u = cp.asnumpy(dev.view(bu, (n,)))
                s = cp.asnumpy(dev.view(bs, (S, n)))
                err = max(rel_err(u, u_cpu), rel_err(s, s_cpu))
                err64 = max(rel_err(u, u64), rel_err(s, s64)) if u64 is not None else None
                guard = dev.guard_ok(bu) and dev.guard_ok(bs)
                note = "" if guard else "GUARD ZONE WRITTEN"
            except Exception as e:  # noqa: BLE001
                err, err64, guard, note = float("inf"), None, False, f"{type(e).__name__}: {e}"
            tol = TOL[math_mode]
            ok = err <= tol and guard
            all_ok &= ok
            rows.append(dict(check=f"fwd {math_mode}", config=name, n=n, err_vs_cpu=err, err_vs_fp64=err64,
                             tol=tol, ok=ok, note=note))
        # in-place (new_state = state) on a copy, default tf32 and fp32 paths
        for math_mode in ("tf32", "fp32"):
            if n < 1000:
                continue
            st = d_state.copy()
            bu = dev.out((n,))
            try:
                K.forward_cuda(d_phi.data.ptr, d_grad.data.ptr, st.data.ptr, scale, n, bu.data.ptr, st.data.ptr,
                               h1, h2, pre, param, math_mode)
                cp.cuda.Device().synchronize()
                err = max(rel_err(cp.asnumpy(dev.view(bu, (n,))), u_cpu), rel_err(cp.asnumpy(st), s_cpu))
                note = ""
            except Exception as e:  # noqa: BLE001
                err, note = float("inf"), f"{type(e).__name__}: {e}"
            tol = TOL[math_mode]
            ok = err <= tol
            all_ok &= ok
            rows.append(dict(check=f"fwd {math_mode} in-place", config=name, n=n, err_vs_cpu=err, err_vs_fp64=None,
                             tol=tol, ok=ok, note=note))
            break
        # backward, with and without d_new_state
        for with_dns in (True, False):
            if not with_dns and n != 4099:
                continue
            du = rng.normal(size=n).astype(np.float32)
            dns = rng.normal(size=(S, n)).astype(np.float32) if with_dns else None
            c_phi, c_grad, c_state = K.backward_cpu(phi, grad, state, scale, du, dns, h1, h2, pre, param)
            P = phi.size
            b_phi = dev.out((P,))
            b_grad, b_state = dev.out((n,)), dev.out((S, n))
            d_du = dev.upload(du)
            d_dns = dev.upload(dns) if with_dns else None
            try:
                K.backward_cuda(d_phi.data.ptr, d_grad.data.ptr, d_state.data.ptr, scale, n, d_du.data.ptr,
                                d_dns.data.ptr if with_dns else 0, b_phi.data.ptr, b_grad.data.ptr,
                                b_state.data.ptr, h1, h2, pre, param)
                cp.cuda.Device().synchronize()
                e_phi = rel_err(cp.asnumpy(dev.view(b_phi, (P,))), c_phi)
                e_grad = rel_err(cp.asnumpy(dev.view(b_grad, (n,))), c_grad)
                e_state = rel_err(cp.asnumpy(dev.view(b_state, (S, n))), c_state)
                err = max(e_phi, e_grad, e_state)
                guard = dev.guard_ok(b_phi) and dev.guard_ok(b_grad) and dev.guard_ok(b_state)
                note = f"d_phi {e_phi:.1e} d_grad {e_grad:.1e} d_state {e_state:.1e}" + ("" if guard else " GUARD")
            except Exception as e:  # noqa: BLE001
                err, guard, note = float("inf"), False, f"{type(e).__name__}: {e}"
            ok = err <= TOL["bwd"] and guard
            all_ok &= ok
            rows.append(dict(check="bwd" + ("" if with_dns else " (no d_new_state)"), config=name, n=n,
                             err_vs_cpu=err, err_vs_fp64=None, tol=TOL["bwd"], ok=ok, note=note))
        # tf32 variants (20/20 only): same function
        if h1 == 20 and n == 4099:
            for v in TF32_VARIANTS[1:]:
                bu, bs = dev.out((n,)), dev.out((S, n))
                try:
                    K._forward_cuda_variant(d_phi.data.ptr, d_grad.data.ptr, d_state.data.ptr, scale, n, bu.data.ptr,
                                            bs.data.ptr, h1, h2, pre, param, *v)
                    cp.cuda.Device().synchronize()
                    err = max(rel_err(cp.asnumpy(dev.view(bu, (n,))), u_cpu),
                              rel_err(cp.asnumpy(dev.view(bs, (S, n))), s_cpu))
                    note = "" if dev.guard_ok(bu) and dev.guard_ok(bs) else "GUARD"
                except Exception as e:  # noqa: BLE001
                    err, note = float("inf"), f"{type(e).__name__}: {e}"
                ok = err <= TOL["tf32"] and not note
                all_ok &= ok
                rows.append(dict(check="fwd tf32 v" + "".join(map(str, v)), config="20/20 (3 modes)", n=n,
                                 err_vs_cpu=err, err_vs_fp64=None, tol=TOL["tf32"], ok=ok, note=note))
        del d_phi, d_grad, d_state
    # NaN gradients: NaN update and state column exactly where the CPU kernel has them, the rest as usual.
    for h1, h2, pre, param in CONFIGS:
        n, S = 4099, 2 * (h1 + h2)
        phi, grad, state = make_inputs(rng, ref, h1, h2, pre, n)
        grad[rng.choice(n, 9, replace=False)] = np.nan
        u_cpu, s_cpu = K.forward_cpu(phi, grad, state, 0.1, h1, h2, pre, param)
        d_phi, d_grad, d_state = dev.upload(phi), dev.upload(grad), dev.upload(state)
        for math_mode in ("fp32", "tf32"):
            bu, bs = dev.out((n,)), dev.out((S, n))
            try:
                K.forward_cuda(d_phi.data.ptr, d_grad.data.ptr, d_state.data.ptr, 0.1, n, bu.data.ptr, bs.data.ptr,
                               h1, h2, pre, param, math_mode)
                cp.cuda.Device().synchronize()
                u = cp.asnumpy(dev.view(bu, (n,)))
                s = cp.asnumpy(dev.view(bs, (S, n)))
                same = np.array_equal(np.isnan(u), np.isnan(u_cpu)) and np.array_equal(np.isnan(s), np.isnan(s_cpu))
                err = max(rel_err(u, u_cpu), rel_err(s, s_cpu)) if same else float("inf")
                note = "" if same else "NaN pattern differs from the CPU kernel's"
            except Exception as e:  # noqa: BLE001
                err, note = float("inf"), f"{type(e).__name__}: {e}"
            ok = err <= TOL[math_mode]
            all_ok &= ok
            rows.append(dict(check=f"fwd {math_mode} NaN grads", config=f"{h1}/{h2} {pre}", n=n, err_vs_cpu=err,
                             err_vs_fp64=None, tol=TOL[math_mode], ok=ok, note=note))
        del d_phi, d_grad, d_state
    # bad config: a message, not a crash
    try:
        K.forward_cuda(1, 1, 1, 1.0, 10, 1, 1, 0, 20, "none", 10.0, "tf32")
        msg = "no error raised"
        ok = False
    except RuntimeError as e:
        msg, ok = f"RuntimeError: {e}", True
    all_ok &= ok
    rows.append(dict(check="bad config (hidden1=0)", config="", n=10, err_vs_cpu=0.0, err_vs_fp64=None, tol=0, ok=ok,
                     note=msg))
    results["correctness"] = rows
    print("\n== correctness: max |gpu - ref| / max |ref| per output, worst output and worst N "
          f"(N in {sorted(set(r['n'] for r in rows))}) ==")
    print(f"{'check':24s} {'config':14s} {'vs CPU':>9s} {'vs fp64':>9s} {'tol':>6s}  ok  note")
    groups = {}
    for r in rows:
        groups.setdefault((r["check"], r["config"]), []).append(r)
    for (check, config), rs in groups.items():
        err = max(r["err_vs_cpu"] for r in rs)
        e64s = [r["err_vs_fp64"] for r in rs if r["err_vs_fp64"] is not None]
        e64 = f"{max(e64s):.2e}" if e64s else "-"
        ok = all(r["ok"] for r in rs)
        notes = sorted(set(r["note"] for r in rs if r["note"] and (not r["ok"] or check.startswith("bad"))))
        if check.startswith("bwd"):
            worst = max(rs, key=lambda r: r["err_vs_cpu"])
            notes = notes or [worst["note"]]
        print(f"{check:24s} {config:14s} {err:9.2e} {e64:>9s} {rs[0]['tol']:6.0e}  {'ok' if ok else 'FAIL'}  "
              f"{'; '.join(notes)[:150]}")
    worst_tf32 = max((r["err_vs_cpu"] for r in rows if r["check"] == "fwd tf32" and r["config"].startswith("20/20")),
                     default=float("nan"))
    print(f"tf32 20/20 worst error vs CPU: {worst_tf32:.2e};  all correctness checks: {'PASS' if all_ok else 'FAIL'}")
    results["correctness_pass"] = bool(all_ok)
    results["tf32_worst_err_vs_cpu"] = worst_tf32
    return all_ok


# ---------------------------------------------------------------------------------------------------------
# Timing

def cuda_time(cp, fn, reps, warmup):
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(reps):
        s, e = cp.cuda.Event(), cp.cuda.Event()
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(cp.cuda.get_elapsed_time(s, e))
    return float(np.median(times))


def copy_bandwidth(cp, reps):
    nbytes = 2 << 30
    a = cp.empty(nbytes // 4, np.float32)
    a.fill(1.0)
    b = cp.empty_like(a)

    def run():
        cp.cuda.runtime.memcpyAsync(b.data.ptr, a.data.ptr, nbytes, cp.cuda.runtime.memcpyDeviceToDevice, 0)

    ms = cuda_time(cp, run, reps=max(5, reps // 2), warmup=2)
    del a, b
    return 2 * nbytes / (ms * 1e-3)


def time_ours(K, cp, n, args, rows, pre="paper", param=10.0):
    h1 = h2 = 20
    S = 80
    P = layout.num_params(h1, h2, layout.input_size(pre))
    rs = cp.random.RandomState(7)
    phi = (rs.standard_normal(P, dtype=np.float32) * 0.3).astype(np.float32)
    grad = rs.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    state = rs.uniform(-1, 1, (S, n), dtype=np.float32)
    upd = cp.empty(n, np.float32)
    ns = cp.empty((S, n), np.float32)
    ptrs = (phi.data.ptr, grad.data.ptr, state.data.ptr, 0.1, n, upd.data.ptr, ns.data.ptr, h1, h2, pre, param)
    for mode in ("tf32", "fp32"):
        ms = cuda_time(cp, lambda: K.forward_cuda(*ptrs, mode), args.reps, args.warmup)
        rows.append(dict(impl=f"ours fwd {mode}" + (" (default)" if mode == "tf32" else ""), n=n, ms=ms,
                         bytes=BYTES_FWD))
    for v in TF32_VARIANTS[1:]:
        try:
            ms = cuda_time(cp, lambda: K._forward_cuda_variant(*ptrs, *v), args.reps, args.warmup)
            rows.append(dict(impl="ours fwd tf32 v" + "".join(map(str, v)), n=n, ms=ms, bytes=BYTES_FWD))
        except Exception as e:  # noqa: BLE001
            log(f"variant {v} failed: {e}")
    # backward (needs its own buffers)
    du = rs.standard_normal(n, dtype=np.float32)
    dns = rs.standard_normal((S, n), dtype=np.float32) * np.float32(0.01)
    dphi = cp.empty(P, np.float32)
    dg = cp.empty(n, np.float32)
    dst = cp.empty((S, n), np.float32)
    bptrs = (phi.data.ptr, grad.data.ptr, state.data.ptr, 0.1, n, du.data.ptr, dns.data.ptr, dphi.data.ptr,
             dg.data.ptr, dst.data.ptr, h1, h2, pre, param)
    reps = args.reps if n <= 1e6 else max(5, args.reps // 2)
    ms = cuda_time(cp, lambda: K.backward_cuda(*bptrs), reps, 1)
    rows.append(dict(impl="ours bwd fp32", n=n, ms=ms, bytes=BYTES_BWD))
    del phi, grad, state, upd, ns, du, dns, dphi, dg, dst
    cp.get_default_memory_pool().free_all_blocks()


def torch_step_fn(h1=20, h2=20, pre="paper", param=10.0):
    import torch

    d = layout.input_size(pre)
    eps = float(np.finfo(np.float32).eps)

    def step(phi, grad, state, scale: float):  # phi: the kernels' flat φ
        t = layout.unflatten(phi, h1, h2, d, reshape=torch.reshape)
        w1, b1, w2, b2 = t["lstm1"]["w"], t["lstm1"]["b"], t["lstm2"]["w"], t["lstm2"]["b"]
        wo, bo = t["out"]["w"], t["out"]["b"]
        grad = torch.clamp(grad, -FLT_MAX, FLT_MAX)  # ±inf act as ±FLT_MAX (lstm_step.h); NaN propagates
        if pre == "none":
            x = grad[None]
        else:
            a = grad.abs()
            if pre == "paper":
                big = a >= math.exp(-param)
                f0 = torch.where(big, torch.log(torch.where(big, a, torch.ones_like(a))) / param, -torch.ones_like(a))
                f1 = torch.where(big, torch.sign(grad), math.exp(param) * grad)
            else:
                f0 = torch.clamp(torch.log(a + eps) / param, min=-1.0)
                f1 = torch.clamp(grad * math.exp(param), -1.0, 1.0)
            x = torch.stack([f0, f1])
        hs1, cs1, hs2, cs2 = torch.split(state, [h1, h1, h2, h2])

        def cell(w, b, inp, c):
            i, f, g, o = torch.chunk(w @ inp + b[:, None], 4)
            cn = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(cn), cn

        nh1, nc1 = cell(w1, b1, torch.cat([x, hs1]), cs1)
        nh2, nc2 = cell(w2, b2, torch.cat([nh1, hs2]), cs2)
        return scale * (wo @ nh2 + bo[0]), torch.cat([nh1, nc1, nh2, nc2])

    return step


def jax_step_fn(h1=20, h2=20, pre="paper", param=10.0):
    import jax
    import jax.numpy as jnp

    d = layout.input_size(pre)
    eps = float(np.finfo(np.float32).eps)

    def step(phi, grad, state, scale):  # phi: the kernels' flat φ
        t = layout.unflatten(phi, h1, h2, d, reshape=jnp.reshape)
        w1, b1, w2, b2 = t["lstm1"]["w"], t["lstm1"]["b"], t["lstm2"]["w"], t["lstm2"]["b"]
        wo, bo = t["out"]["w"], t["out"]["b"]
        grad = jnp.clip(grad, -FLT_MAX, FLT_MAX)  # ±inf act as ±FLT_MAX (lstm_step.h); NaN propagates
        if pre == "none":
            x = grad[None]
        else:
            a = jnp.abs(grad)
            if pre == "paper":
                big = a >= math.exp(-param)
                f0 = jnp.where(big, jnp.log(jnp.where(big, a, 1.0)) / param, -1.0)
                f1 = jnp.where(big, jnp.sign(grad), math.exp(param) * grad)
            else:
                f0 = jnp.maximum(jnp.log(a + eps) / param, -1.0)
                f1 = jnp.clip(grad * math.exp(param), -1.0, 1.0)
            x = jnp.stack([f0, f1])
        hs1, cs1, hs2, cs2 = jnp.split(state, [h1, 2 * h1, 2 * h1 + h2])

        def cell(w, b, inp, c):
            i, f, g, o = jnp.split(w @ inp + b[:, None], 4)
            cn = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            return jax.nn.sigmoid(o) * jnp.tanh(cn), cn

        nh1, nc1 = cell(w1, b1, jnp.concatenate([x, hs1]), cs1)
        nh2, nc2 = cell(w2, b2, jnp.concatenate([nh1, hs2]), cs2)
        return scale * (wo @ nh2 + bo[0]), jnp.concatenate([nh1, nc1, nh2, nc2])

    return jax.jit(step)


def framework_check_inputs(ref):
    rng = np.random.default_rng(5)
    phi, grad, state = make_inputs(rng, ref, 20, 20, "paper", 2000)
    u64, s64 = reference_step(phi, grad, state, 0.1, 20, 20, "paper", 10.0)
    return phi, grad, state, u64, s64


def framework_verdict(err):
    """A warning when a framework's step is not the same function as ours (then its timing compares unlike work)."""
    return "" if err < TOL["tf32"] else f"  -- NOT the same step (tolerance {TOL['tf32']:g}): its timing is not comparable"


def time_torch(ref, sizes, args, rows, results):
    import torch

    step = torch_step_fn()
    cstep = torch.compile(step, dynamic=True)  # one compilation for all N (keeps the check cheap)
    phi, grad, state, u64, s64 = framework_check_inputs(ref)
    t = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
    t0 = time.time()
    u, s = cstep(t(phi), t(grad), t(state), 0.1)
    torch.cuda.synchronize()
    err = max(rel_err(u.cpu().numpy(), u64), rel_err(s.cpu().numpy(), s64))
    results["torch_compile_err_vs_fp64"] = err
    log(f"torch.compile: first compile + run {time.time() - t0:.1f}s, error vs fp64 {err:.2e} "
        f"(allow_tf32={torch.backends.cuda.matmul.allow_tf32}){framework_verdict(err)}")
    for n in sizes:
        if elapsed() > args.budget_s:
            log(f"torch.compile N={n}: skipped (time budget)")
            continue
        g = torch.Generator(device="cuda").manual_seed(3)
        p_ = torch.randn(phi.size, device="cuda", generator=g) * 0.3
        g_ = torch.randn(n, device="cuda", generator=g) * 1e-3
        s_ = torch.rand((80, n), device="cuda", generator=g) * 2 - 1
        for _ in range(args.warmup):
            cstep(p_, g_, s_, 0.1)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            cstep(p_, g_, s_, 0.1)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        rows.append(dict(impl="torch.compile fwd", n=n, ms=float(np.median(times)), bytes=BYTES_FWD))
        del p_, g_, s_
        torch.cuda.empty_cache()


def time_jax(ref, sizes, args, rows, results):
    import jax
    import jax.numpy as jnp

    step = jax_step_fn()
    phi, grad, state, u64, s64 = framework_check_inputs(ref)
    u, s = step(jnp.asarray(phi), jnp.asarray(grad), jnp.asarray(state), 0.1)
    err = max(rel_err(np.asarray(u), u64), rel_err(np.asarray(s), s64))
    results["jax_err_vs_fp64"] = err
    log(f"JAX jit: error vs fp64 {err:.2e} (default matmul precision), devices {jax.devices()}{framework_verdict(err)}")
    for n in sizes:
        if elapsed() > args.budget_s:
            log(f"JAX N={n}: skipped (time budget)")
            continue
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
        p_ = jax.random.normal(k1, (phi.size,), jnp.float32) * 0.3
        g_ = jax.random.normal(k2, (n,), jnp.float32) * 1e-3
        s_ = jax.random.uniform(k3, (80, n), jnp.float32, -1.0, 1.0)
        for _ in range(args.warmup):
            jax.block_until_ready(step(p_, g_, s_, 0.1))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(step(p_, g_, s_, 0.1))
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(dict(impl="JAX jit fwd (wall)", n=n, ms=float(np.median(times)), bytes=BYTES_FWD))
        del p_, g_, s_


def timing(K, ref, cp, args, results):
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    rows = []
    bw = copy_bandwidth(cp, args.reps)
    results["copy_bandwidth_GBps"] = bw / 1e9
    log(f"device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
    for n in sizes:
        rows.append(dict(impl=f"memory floor ({BYTES_FWD} B/coord)", n=n, ms=BYTES_FWD * n / bw * 1e3,
                         bytes=BYTES_FWD))
    for n in sizes:
        log(f"timing our kernels, N={n}")
        try:
            time_ours(K, cp, n, args, rows)
        except Exception as e:  # noqa: BLE001
            log(f"timing our kernels at N={n} failed: {type(e).__name__}: {e}")
    cp.get_default_memory_pool().free_all_blocks()
    if not args.no_frameworks:
        for name, fn in (("torch.compile", time_torch), ("JAX", time_jax)):
            if elapsed() > args.budget_s:
                log(f"{name}: skipped (time budget)")
                continue
            try:
                fn(ref, sizes, args, rows, results)
            except Exception as e:  # noqa: BLE001
                log(f"{name}: skipped ({type(e).__name__}: {str(e)[:300]})")
            try:
                import torch
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001
                pass
    for r in rows:
        r["GBps"] = r["bytes"] * r["n"] / (r["ms"] * 1e-3) / 1e9
        r["x_floor"] = r["ms"] / (r["bytes"] * r["n"] / bw * 1e3)
    results["timing"] = rows
    print(f"\n== timing: median of {args.reps} (CUDA events; JAX: wall clock per synchronised call) ==")
    print(f"{'impl':28s} {'N':>9s} {'ms':>9s} {'GB/s':>7s} {'x floor':>8s}")
    for r in sorted(rows, key=lambda r: (r["n"], r["ms"])):
        print(f"{r['impl']:28s} {r['n']:9d} {r['ms']:9.3f} {r['GBps']:7.0f} {r['x_floor']:8.2f}")
    print(f"(GB/s and floor use {BYTES_FWD} B/coord for the forward, {BYTES_BWD} B/coord for the backward; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s)")


def _kernel_name(mangled):
    m = re.search(r"fwd_tf32_kernelILi(\d+)ELi(\d+)ELi([12])ELi([12])ELi([23])ELi([01])", mangled)  # J1 J2 D MT ST ACT
    if m:
        return f"tf32 D={m.group(3)} MT={m.group(4)} ST={m.group(5)} ACT={m.group(6)}"
    for key, name in (("fwd_fp32", "fwd_fp32"), ("bwd_kernel", "bwd")):
        if key in mangled:
            return name
    return mangled[:40]


def build_report(module_dir, results):
    """Per kernel: registers and spills (ptxas -v log) and SASS instruction counts (cuobjdump -sass)."""
    info = {}
    log_path = os.path.join(module_dir, "nvcc.log")
    if os.path.exists(log_path):
        name = None
        for line in open(log_path):
            if "Compiling entry function" in line:
                name = _kernel_name(line)
            elif name and "spill stores" in line:
                info.setdefault(name, {})["spills"] = line.strip()
            elif name and "Used" in line and "registers" in line:
                m = re.search(r"Used (\d+) registers", line)
                info.setdefault(name, {})["registers"] = int(m.group(1)) if m else None
    sass_path = os.path.join(module_dir, "sass.txt")
    if os.path.exists(sass_path):
        name = None
        for line in open(sass_path):
            if "Function :" in line:
                name = _kernel_name(line.split("Function :")[1].strip())
                info.setdefault(name, {})
                for k in ("HMMA", "LDGSTS", "MUFU", "LDL/STL"):
                    info[name].setdefault(k, 0)
            elif name:
                for k, pat in (("HMMA", r"\bHMMA"), ("LDGSTS", r"\bLDGSTS"), ("MUFU", r"\bMUFU"),
                               ("LDL/STL", r"\b(LDL|STL)\b")):
                    if re.search(pat, line):
                        info[name][k] += 1
    if info:
        print("== kernels: ptxas registers / spills, SASS counts (HMMA tensor-core mma, LDGSTS cp.async, "
              "LDL/STL local memory)")
        for name in sorted(info):
            d = info[name]
            print(f"  {name:26s} regs {str(d.get('registers', '?')):>4s}  HMMA {d.get('HMMA', '-'):>4}  "
                  f"LDGSTS {d.get('LDGSTS', '-'):>3}  MUFU {d.get('MUFU', '-'):>4}  LDL/STL {d.get('LDL/STL', '-'):>3}  "
                  f"[{d.get('spills', '')}]")
    results["kernels"] = info


def main():
    args = parse_args()
    if not args.module_dir:
        sys.exit("--module-dir is required (tools/gpu_check.sh builds the module and passes it)")
    K = load_kernels(args.module_dir)
    ref = load_reference()
    imported = sorted({"tensorflow", "l2l_tf"} & set(sys.modules))
    assert not imported, f"gpu_check must run without TensorFlow and the l2l_tf package, but imported {imported}"
    results = {"argv": sys.argv[1:]}
    build_report(args.module_dir, results)
    if args.cpu_selftest:
        sys.exit(0 if cpu_selftest(K, ref) else 1)
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    results["device"] = name
    results["sms"] = props["multiProcessorCount"]
    log(f"device: {name}, {props['multiProcessorCount']} SMs, cc {props['major']}.{props['minor']}, "
        f"CUDA module cuda_available={K.cuda_available()}")
    ok = correctness(K, ref, cp, results)
    if not args.no_timing:
        timing(K, ref, cp, args, results)
    out = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    log("done")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
