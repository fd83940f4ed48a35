"""What the CPU that runs a model can do with int8, and which int8 weight form is exact on it.

onnxruntime multiplies uint8 activations by int8 weights with ``vpmaddubsw`` on x86 CPUs
without VNNI (AVX2, AVX-512 without VNNI): each pair of products is summed in 16 bits and
saturates (255 · 127 · 2 > 32767), so full-range int8 weights lose accuracy there. With VNNI
(AVX-VNNI, AVX-512 VNNI) or AMX the sums are 32-bit and exact. On a saturating CPU graphopt
writes weights as uint8 with zero point 128 (onnxruntime's U8U8 kernels widen to 16 bits
before multiplying: exact, same 8-bit grid); ``s7`` — int8 weights on 7 bits, onnxruntime's
``reduce_range`` — is the other remedy, exact too but on half the grid.

Features come from numpy's own CPUID probe (what the process's CPU reports — under an
emulator too, where ``/proc/cpuinfo`` is the host's), completed by ``/proc/cpuinfo`` for the
flags numpy does not probe (AVX-VNNI, AMX). ``GRAPHOPT_CPU`` (``native``, ``avx2``, ``vnni``)
overrides them, for a model meant for another machine (``--target-cpu``) or a test.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Literal

TargetCpu = Literal["native", "avx2", "vnni"]
TARGET_CPUS: tuple[str, ...] = ("native", "avx2", "vnni")
WeightForm = Literal["s8", "u8", "s7"]

_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    name: str
    x86: bool
    avx2: bool
    avx512: bool
    vnni: bool
    amx: bool

    @property
    def int8_saturates(self) -> bool:
        """uint8 × int8 products saturate in onnxruntime's kernels on this CPU."""
        return self.x86 and not self.vnni

    @property
    def int8_weight_form(self) -> WeightForm:
        """The int8 weight form that is exact and full-precision here."""
        return "u8" if self.int8_saturates else "s8"

    def describe(self) -> str:
        isa = [flag for flag, present in (("AVX2", self.avx2), ("AVX-512", self.avx512), ("VNNI", self.vnni),
                                          ("AMX", self.amx)) if present]
        return f"{self.name} ({', '.join(isa) or 'no x86 SIMD'})"


def target_cpu(target: str | None = None) -> CpuFeatures:
    """The CPU a model is made for: ``target`` ('avx2', 'vnni'), else ``GRAPHOPT_CPU``, else this one."""
    target = target or os.environ.get("GRAPHOPT_CPU") or "native"
    if target == "native":
        return native_cpu()
    if target == "avx2":
        return CpuFeatures("an AVX2 CPU without VNNI", True, True, False, False, False)
    if target == "vnni":
        return CpuFeatures("a CPU with VNNI", True, True, True, True, False)
    raise ValueError(f"unknown target CPU '{target}'; one of {', '.join(TARGET_CPUS)}")


@lru_cache(maxsize=1)
def native_cpu() -> CpuFeatures:
    name, flags = _proc_cpuinfo()
    probed = _numpy_probe()
    if probed:  # CPUID as this process sees it; /proc only for what numpy does not probe
        flags = {flag for flag in flags if flag in ("avx_vnni", "amx_int8")}
        flags |= {flag for flag, key in (("avx2", "AVX2"), ("avx512f", "AVX512F"), ("avx512_vnni", "AVX512VNNI"))
                  if probed.get(key)}
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    return CpuFeatures(name, x86, "avx2" in flags, "avx512f" in flags, bool(flags & _VNNI_FLAGS),
                       "amx_int8" in flags)


def _proc_cpuinfo() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name, flags


def _numpy_probe() -> dict[str, bool]:
    """numpy's run-time CPU dispatch table (it executes CPUID itself); {} where it has none."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return {}
    return dict(__cpu_features__)


__all__ = ["CpuFeatures", "TARGET_CPUS", "TargetCpu", "WeightForm", "native_cpu", "target_cpu"]
