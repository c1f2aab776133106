"""Which floating-point kernels a run uses, and a profile that gives the same bits on any x86-64 CPU with AVX2.

A CPU run is deterministic on its machine, but the last bits of its sums depend
on the kernels that PyTorch, MKL and oneDNN pick for the CPU at hand (AVX2 or
AVX-512, Intel or AMD, the cache sizes) and on the thread count. So the same
run on two machines agrees to float rounding (about 1e-6), not bit for bit.

The *portable* profile pins every one of those choices (measured on this
project's tests: each variable alone changes bits):

===================  ============  =====================================================
variable             value         what it pins
===================  ============  =====================================================
ATEN_CPU_CAPABILITY  avx2          PyTorch's own kernels (softmax, norms, reductions):
                                   the AVX2 build, also on an AVX-512 CPU
MKL_CBWR             COMPATIBLE    MKL's matrix products: its SSE2 branch, the same code
                                   on Intel and AMD. (Its AVX2 branch still differs
                                   between Intel and AMD for small matrices, <= 8 rows.)
MKL_DYNAMIC          FALSE         MKL may not change its thread count by itself
ONEDNN_MAX_CPU_ISA   AVX2          oneDNN's convolutions (the image towers' stems)
OMP_NUM_THREADS      1             reductions split by thread count; 1 also makes 1 and
                                   N processes give the same bits
===================  ============  =====================================================

The variables are read when the libraries start, so they must be set before
``import torch``: ``FEDCLIP_NUMERICS=portable fedclip-lightning ...`` sets them
(the command line does it before importing torch), or export them yourself.
This module imports nothing heavy at module level for that reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SWITCH = "FEDCLIP_NUMERICS"

PORTABLE: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
}


class NumericsError(Exception):
    """FEDCLIP_NUMERICS asked for something that cannot be had in this process (raised as a user error)."""


def apply_switch() -> None:
    """Honour ``FEDCLIP_NUMERICS=portable|native`` (unset: native). Called by the command line before it
    imports torch. A variable of the profile already set to another value is refused, not overridden."""
    wanted = os.environ.get(SWITCH, "native").strip().lower()
    if wanted in ("", "native"):
        return
    if wanted != "portable":
        raise NumericsError(f"{SWITCH}={os.environ[SWITCH]!r}: unknown value. Fix: use {SWITCH}=portable "
                            "(the same bits on any x86-64 CPU with AVX2) or leave it unset (this CPU's own kernels).")
    clash = [f"{k}={os.environ[k]!r}" for k, v in PORTABLE.items() if k in os.environ and os.environ[k] != v]
    if clash:
        raise NumericsError(f"{SWITCH}=portable needs {', '.join(f'{k}={v}' for k, v in PORTABLE.items())}, "
                            f"but the environment sets {', '.join(clash)}. Fix: unset those variables.")
    if "torch" in sys.modules and not is_portable():
        raise NumericsError(f"{SWITCH}=portable must be set before torch is imported (its kernels are chosen "
                            "then). Fix: set it in the environment that starts the process.")
    os.environ.update(PORTABLE)


def is_portable(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(env.get(k) == v for k, v in PORTABLE.items())


def cpuinfo(field: str) -> str:
    """The first ``field`` of Linux's /proc/cpuinfo (``model name``, ``flags``...); '' where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.split(":", 1)[0].strip() == field), "")


def cpu_model() -> str:
    """The CPU's model name ('' where /proc/cpuinfo does not say)."""
    return cpuinfo("model name")


def describe() -> dict[str, object]:
    """The numerics this process runs with, for summary.json and the run's header."""
    import torch

    return {
        "profile": "portable" if is_portable() else "native",
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in PORTABLE if k in os.environ},
        "torch": torch.__version__,
    }


def header_line(info: dict[str, object]) -> str:
    if info["profile"] == "portable":
        return (f"numerics: portable ({SWITCH}=portable: AVX2 kernels, MKL COMPATIBLE, "
                f"{info['threads']} thread(s)): the same bits on any x86-64 CPU with AVX2")
    return (f"numerics: this CPU's own kernels ({info['cpu_capability']}, {info['threads']} thread(s)): "
            f"bitwise on this machine; elsewhere to float rounding ({SWITCH}=portable for the same bits anywhere)")
