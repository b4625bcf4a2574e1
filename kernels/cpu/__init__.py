"""C++ kernels for the CPU (paged_attention.cpp, elementwise.cpp, linear.cpp), built with
torch's extension builder on first use and cached by it (~/.cache/torch_extensions); they
register as torch.ops.litmus.*.

The build is compiled for this machine's CPU (-march=native), so its name carries a hash of the
source, the torch version and the CPU's model and feature flags: a home directory shared by a
different CPU builds its own copy instead of loading instructions that CPU may lack.
"""
from __future__ import annotations

import functools
import hashlib
import platform
import warnings
from pathlib import Path

import torch

DIRECTORY = Path(__file__).parent
SOURCES = sorted(DIRECTORY.glob("*.cpp"))


class CpuKernelsUnavailable(RuntimeError):
    """The C++ kernels could not be built here (no compiler, no ninja...)."""


@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_signature() -> str:
    wanted = ("vendor_id", "model name", "flags")
    lines = {line for line in cpuinfo().splitlines() if line.split(":")[0].strip() in wanted}
    return "\n".join(sorted(lines)) or platform.processor() or platform.machine()


def extension_name() -> str:
    digest = hashlib.sha256()
    code = [path.read_bytes() for path in SOURCES + sorted(DIRECTORY.glob("*.h"))]
    for part in (*code, torch.__version__.encode(), _cpu_signature().encode()):
        digest.update(part)
    return f"litmus_cpu_{digest.hexdigest()[:16]}"


@functools.cache
def load() -> None:
    """Builds (or finds built) and loads the kernels; raises CpuKernelsUnavailable if it can't."""
    from torch.utils import cpp_extension

    # -fopenmp: at::parallel_for is a header template whose threads are OpenMP pragmas, compiled
    # out (one thread) without it.
    flags = ["-O3", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64") else [])
    try:
        cpp_extension.load(name=extension_name(), sources=[str(path) for path in SOURCES], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as exc:  # the builder raises RuntimeError, OSError, CalledProcessError...
        raise CpuKernelsUnavailable(f"building the C++ kernels in {DIRECTORY} failed: {exc}") from exc
    from litmus_kernels.cpu import fake

    fake.register()


def available(required: bool = False) -> bool:
    """Whether the kernels load. A failure raises when they are required; otherwise it is warned
    about once, and the torch reference runs instead."""
    if required:
        load()
        return True
    return _loads()


@functools.cache
def _loads() -> bool:
    try:
        load()
    except CpuKernelsUnavailable as exc:
        warnings.warn(f"{exc}; the torch reference runs instead", RuntimeWarning, stacklevel=3)
        return False
    return True
