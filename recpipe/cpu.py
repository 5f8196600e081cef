"""CPU features, in one place: what llama.cpp's CPU backend and torch's CPU kernels can use on this machine.

llama.cpp reports them in its system-info line ('AVX2 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | ...'); reading
that line imports llama_cpp, so it is read only when asked for (and once). torch's view is the kernel's CPU
flags.

`RECPIPE_CPU_BF16=0` (or `1`) overrides both answers about native bfloat16, so that one machine can take the
choices another kind of CPU would (`auto` precisions and requantisations) and its tests cover them.
"""

from __future__ import annotations

import functools
import os
import re

BF16_ENV = "RECPIPE_CPU_BF16"


def bf16_override() -> bool | None:
    """The RECPIPE_CPU_BF16 override: True / False, or None when unset (detect)."""
    v = os.environ.get(BF16_ENV, "").strip().lower()
    if v in ("", "auto"):
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    from recpipe.errors import ConfigError

    raise ConfigError(f"{BF16_ENV} must be 0 or 1 (or unset), not {v!r}")


def native_bf16(system_info: str) -> bool:
    """Whether a llama.cpp system-info line reports native BF16 dot products (AVX512-BF16 or AMX-BF16)."""
    return re.search(r"\b(AVX512_BF16|AMX_BF16)\s*=\s*1\b", system_info) is not None


@functools.lru_cache(maxsize=1)
def llama_system_info() -> str:
    """llama.cpp's system-info line (the SIMD features its CPU backend uses here, 'AVX2 = 1 | ...'); '' when
    llama-cpp-python is missing or has no such API."""
    try:
        import llama_cpp

        return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - no llama.cpp, or an API without it: nothing to report
        return ""


def cpu_has_bf16() -> bool:
    """Whether llama.cpp's CPU backend multiplies BF16 natively on this machine, as its build reports it;
    False when llama-cpp-python is missing (the portable choice)."""
    forced = bf16_override()
    return native_bf16(llama_system_info()) if forced is None else forced


def cpu_has_amx() -> bool:
    """Whether llama.cpp's build uses the AMX-INT8 backend here (Sapphire Rapids and later Xeons)."""
    return re.search(r"\bAMX_INT8\s*=\s*1\b", llama_system_info()) is not None


def cpuinfo_has_bf16() -> bool:
    """Whether the kernel lists native bfloat16 (x86 avx512_bf16 or amx_bf16) among this CPU's flags: what torch's
    CPU kernels can use, read without llama.cpp; elsewhere bf16 is emulated and slower than float32."""
    forced = bf16_override()
    if forced is not None:
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


# the features a benchmark table names: what decides how fast torch's and llama.cpp's CPU kernels run here
FEATURES = {"AVX2": {"avx2"}, "AVX512": {"avx512f"}, "BF16": {"avx512_bf16", "amx_bf16"}, "AMX": {"amx_tile"}}


def _cpuinfo_fields() -> tuple[str, set[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("", set()) where it cannot be read."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def describe(threads: int | None = None) -> dict:
    """The CPU a timing was taken on, for a benchmark table: model name, which of AVX2 / AVX512 / BF16 / AMX
    the kernel lists (the hardware's, RECPIPE_CPU_BF16 does not change it), the threads used (default torch's)
    and the logical CPUs present; `text` is the one-line form."""
    import platform

    name, flags = _cpuinfo_fields()
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    features = [f for f, names in FEATURES.items() if names & flags]
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    cpus = os.cpu_count() or 0
    text = (f"{name} ({', '.join(features) if features else 'none of ' + '/'.join(FEATURES)}), "
            f"{threads} thread{'s' if threads != 1 else ''} of {cpus} CPUs")
    return {"model": name, "features": features, "threads": int(threads), "cpus": cpus, "text": text}
