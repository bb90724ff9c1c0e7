"""The fused generation step: one C function runs every layer of a WaveNet step (and sampling).

Batch-1 generation in PyTorch is dispatch-bound: a step of the 30-layer reference decoder is
~130 small kernels, each costing microseconds of framework overhead around a few microseconds of
arithmetic. ``kernels/wavenet_step.c`` does the same arithmetic on the same folded weights as
:class:`~largewave.models.wavenet.IncrementalState`, in one call per run of steps.

The kernel is plain C, compiled once per machine with the system's C compiler (``cc -O3
-march=native``) and cached under ``$LARGEWAVE_CACHE/kernels`` (default
``~/.cache/largewave/kernels``), keyed by the source, the compiler and the CPU's flags, written to
a temporary name and renamed, so that concurrent processes, ranks and requeued jobs share one
build. Compiling takes about a second. Where there is no compiler (or ``LARGEWAVE_FUSED_STEP=0``),
:func:`kernel` returns None and generation stays on the PyTorch path.

Two weight precisions:

- ``fp32``: exact — the same folded fp32 weights as the PyTorch step (teacher-forced logits agree
  with the full forward to float rounding);
- ``bf16``: the step's weight matrices rounded to bfloat16 (half the bytes streamed per step),
  every product accumulated in fp32 — a reduced-precision mode for fast sampling.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from largewave.cache import cache_dir as largewave_cache

SOURCE = Path(__file__).with_name("kernels") / "wavenet_step.c"
CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99"]

_lock = threading.Lock()
_cached: dict[str, object] = {}


class _Ctx(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("L", "R", "G", "S", "V", "B", "k", "N", "hop", "P", "wbf16")] + [
        (name, ctypes.c_void_p) for name in (
            "dil", "embed", "w_past", "w_cur", "w_res", "w_skip", "w_out1", "w_out2", "b_skip", "b_out1", "b_out2",
            "const_bias", "frame_bias", "hist", "x", "pre", "z", "h1", "h2", "logits", "prof")]

# the step's phases as timed by the kernel when profiling (its enum, in order)
PHASES = ("input and history", "dilated convs", "gates", "residuals", "skips", "output layers", "sampling")


def cache_dir() -> Path:
    return largewave_cache() / "kernels"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and flags (nodes of a cluster may differ)."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "Model", "CPU part") and not model:
                    model = v.strip()
                elif k in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(v.split()))
    except OSError:
        pass
    return f"{model}|{flags}|{os.uname().machine}"


def _compiler() -> Optional[str]:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def build(verbose: bool = False) -> tuple[Optional[Path], str]:
    """(path of the compiled kernel, "") or (None, why not). Compiles at most once per key."""
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc} --version failed: {e}"
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + version.encode() + _cpu_key().encode() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / f"wavenet_step-{key}.so"
    if out.exists():
        return out, ""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
        os.close(fd)
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            os.unlink(tmp)
            return None, f"{cc} failed: {r.stderr.strip()[-500:]}"
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not build the fused step in {out.parent}: {e}"
    if verbose:
        print(f"[largewave] compiled the fused generation step: {out}", file=sys.stderr, flush=True)
    return out, ""


def kernel() -> Optional[ctypes.CDLL]:
    """The loaded kernel, or None where it cannot be had (the reason: :func:`unavailable_reason`)."""
    if os.environ.get("LARGEWAVE_FUSED_STEP", "1") in ("0", "false", "no", "off"):
        return None
    with _lock:
        if "lib" not in _cached:
            path, why = build()
            lib = None
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                    lib.lw_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                           ctypes.c_int64, ctypes.c_void_p, ctypes.c_float]
                    lib.lw_run.restype = ctypes.c_int
                    lib.lw_logits.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
                    lib.lw_logits.restype = ctypes.c_int
                    for fn in (lib.lw_gate_forward, lib.lw_gate_backward):
                        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 4
                        fn.restype = ctypes.c_int
                except OSError as e:
                    lib, why = None, f"could not load {path}: {e}"
            _cached["lib"], _cached["why"] = lib, why
        return _cached["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str:
    kernel()
    if os.environ.get("LARGEWAVE_FUSED_STEP", "1") in ("0", "false", "no", "off"):
        return "LARGEWAVE_FUSED_STEP=0"
    return str(_cached.get("why", ""))


def supports(state) -> bool:
    """Whether the fused step can run this :class:`IncrementalState` (CPU, fp32, 1 input tap)."""
    return (state.device.type == "cpu" and state.hist.dtype == torch.float32
            and state.net.input_kernel_size == 1 and kernel() is not None)


def _bf16_bits(t: torch.Tensor) -> torch.Tensor:
    """bfloat16 rounding of t (round to nearest even), as the int16 bit patterns the kernel reads."""
    return t.to(torch.bfloat16).view(torch.int16).contiguous()


class FusedStep:
    """Binds an :class:`IncrementalState`'s buffers to the kernel; the state stays the owner.

    ``precision``: ``"fp32"`` (exact) or ``"bf16"`` (weights rounded to bfloat16, fp32 accumulation).
    """

    def __init__(self, state, precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={precision!r} must be 'fp32' or 'bf16'")
        lib = kernel()
        if lib is None:
            raise RuntimeError(f"the fused generation step is unavailable: {unavailable_reason()}")
        self.lib, self.state, self.precision = lib, state, precision
        s = state
        weights = {"w_past": s.w_past, "w_cur": s.w_cur_all, "w_res": s.w_res_all, "w_skip": s.w_skip,
                   "w_out1": s.w_out1, "w_out2": s.w_out2}
        if precision == "bf16":
            weights = {k: _bf16_bits(v) for k, v in weights.items()}
        self._keep = dict(weights, dil=torch.tensor(s.net.dilations, dtype=torch.int64))  # alive while bound
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.ctx = _Ctx(L=s.L, R=s.R, G=s.G, S=s.net.skip_channels, V=s.net.vocab, B=s.batch, k=s.k, N=s.N,
                        hop=s.hop, P=0 if s.frame_bias is None else len(s.frame_bias_at), wbf16=int(precision == "bf16"),
                        dil=ptr(self._keep["dil"]), embed=ptr(s.embed), b_skip=ptr(s.b_skip), b_out1=ptr(s.b_out1),
                        b_out2=ptr(s.b_out2), const_bias=ptr(None if s.frame_bias is not None else s.const_bias),
                        frame_bias=ptr(s.frame_bias), hist=ptr(s.hist), x=ptr(s.x), pre=ptr(s.pre),
                        z=ptr(s.z), h1=ptr(s.h1), h2=ptr(s.h2), logits=ptr(s.logits),
                        **{k: ptr(v) for k, v in weights.items()})
        self.ctx_ref = ctypes.byref(self.ctx)

    def run(self, t0: int, n: int, tokens: torch.Tensor, n_forced: int, noise: Optional[torch.Tensor],
            inv_t: float) -> None:
        """Steps t0 … t0+n−1 into ``tokens`` (LongTensor[T x B], time-major); see ``lw_run``."""
        self.lib.lw_run(self.ctx_ref, t0, n, tokens.data_ptr(), n_forced,
                        None if noise is None else noise.data_ptr(), inv_t)

    def profile(self, on: bool = True) -> None:
        """Start (or stop) timing every step's phases; :meth:`phase_seconds` reads the totals."""
        self._prof = torch.zeros(len(PHASES) + 1, dtype=torch.float64) if on else None
        self.ctx.prof = None if self._prof is None else self._prof.data_ptr()

    def phase_seconds(self) -> dict[str, float]:
        if getattr(self, "_prof", None) is None:
            return {}
        return dict(zip(PHASES, self._prof[:len(PHASES)].tolist()))

    def logits(self, t: int, prev: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits of step t given the previous tokens (LongTensor[B], contiguous) — the state's buffer."""
        self.lib.lw_logits(self.ctx_ref, t, None if prev is None else prev.data_ptr())
        return self.state.logits


# ---- the gates of training --------------------------------------------------------------------


def gates_supported(a: torch.Tensor) -> bool:
    """Whether :func:`gate_forward`/:func:`gate_backward` can run on ``a``: a contiguous fp32 CPU
    tensor, one torch thread (the kernel is single-threaded: with more threads PyTorch's own
    elementwise kernels split the work), and the kernel built."""
    return (a.device.type == "cpu" and a.dtype == torch.float32 and a.is_contiguous()
            and torch.get_num_threads() == 1 and kernel() is not None)


def gate_forward(a: torch.Tensor, z: torch.Tensor) -> None:
    """In place, one pass: a[:, :H] ← tanh, a[:, H:] ← sigmoid, z ← their product.
    a: Tensor[B x G x T] contiguous; z: Tensor[B x H x T] with contiguous [H x T] blocks."""
    B, G, T = a.shape
    kernel().lw_gate_forward(a.data_ptr(), z.data_ptr(), B, G // 2, T, z.stride(0))


def gate_backward(a: torch.Tensor, dz: torch.Tensor) -> None:
    """In place, one pass: a (holding tanh, sigmoid) ← the gradient of the pre-activations."""
    B, G, T = a.shape
    dz = dz if dz.stride(2) == 1 and dz.stride(1) == T else dz.contiguous()
    kernel().lw_gate_backward(a.data_ptr(), dz.data_ptr(), B, G // 2, T, dz.stride(0))
