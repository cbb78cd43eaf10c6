"""Building the CUDA kernels of `csrc/`: nvcc for the kernels, a torch extension for the binding.

Each build is keyed by the sources, the target architecture and the compiler version, and cached
under `$MUXSERVE_CACHE/kernels`; a file lock keeps concurrent processes from building twice.

Before building, nvcc's CUDA version is checked against the driver's and torch's
(`check_toolchain`): the library links nvcc's runtime statically, so an nvcc newer (in major
version) than the driver builds fine and then fails every launch with CUDA error 35.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from muxserve.config import default_cache_dir

CSRC = Path(__file__).resolve().parents[3] / "csrc"


class KernelBuildError(RuntimeError):
    """The CUDA kernels could not be built or loaded on this machine."""


EMULATED = "emulated"  # the build that runs the kernels on a CPU (csrc/emulation/; tests only)


@dataclass(frozen=True)
class BuildPlan:
    """What a kernel build compiles, for which target, and where it is cached.

    `arch` is a compute capability without the dot ("90"), or EMULATED: the same sources built
    with g++ against csrc/emulation/, whose binding takes CPU tensors.
    """

    sources: tuple[Path, ...]  # csrc/*.cu
    binding: Path  # csrc/bindings.cpp
    arch: str
    key: str  # hash of the sources, the compilers and torch: a new key is a new build
    directory: Path

    @property
    def library(self) -> Path:
        return self.directory / "libmuxserve_cuda.so"

    @property
    def module_name(self) -> str:
        return f"muxserve_kernels_{self.key}"

    def compile_command(self, source: Path, compiler: str) -> list[str]:
        """The command that compiles one .cu file into a position-independent object."""
        out = str(self.directory / f"{source.stem}.o")
        if self.arch == EMULATED:
            return [
                compiler, "-c", "-std=c++20", "-O1", "-fPIC", "-fno-strict-aliasing",
                "-Wno-unknown-pragmas", "-I", str(source.parent / "emulation"),
                "-I", str(source.parent), "-x", "c++", str(source), "-o", out,
            ]  # fmt: skip
        gencode = f"arch=compute_{self.arch},code=sm_{self.arch}"
        return [
            compiler, "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-gencode", gencode,
            "-I", str(source.parent), str(source), "-o", out,
        ]  # fmt: skip

    def link_command(self, output: Path, compiler: str) -> list[str]:
        """The command that links the objects into one shared library (nvcc: cudart static)."""
        objects = [str(self.directory / f"{s.stem}.o") for s in self.sources]
        return [compiler, "-shared", "-o", str(output), *objects]


def kernel_cache_dir() -> Path:
    return default_cache_dir() / "kernels"


def compiler_for(arch: str) -> str:
    return os.environ.get("CXX", "g++") if arch == EMULATED else "nvcc"


def build_plan(arch: str, cache_dir: Path | None = None) -> BuildPlan:
    """The build for `arch` ("90", or EMULATED), keyed by everything that affects it."""
    sources = tuple(sorted(CSRC.glob("*.cu")))
    if not sources:
        raise KernelBuildError(f"no CUDA sources in {CSRC}")
    digest = hashlib.sha256()
    for f in sorted(CSRC.rglob("*")):
        if f.suffix in (".cu", ".cuh", ".h", ".cpp"):
            digest.update(str(f.relative_to(CSRC)).encode() + b"\0" + f.read_bytes())
    digest.update(_version(compiler_for(arch)).encode())
    digest.update(f"{torch.__version__} {sys.version_info[:2]} {arch}".encode())
    key = digest.hexdigest()[:16]
    directory = (cache_dir or kernel_cache_dir()) / f"{arch}-{key}"
    return BuildPlan(sources, CSRC / "bindings.cpp", arch, key, directory)


def _version(compiler: str) -> str:
    try:
        return subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise KernelBuildError(f"{compiler} not usable ({e})") from e


def build(plan: BuildPlan, verbose: bool = False) -> ModuleType:
    """Compile (once; later calls find the cache) and import the kernels' torch extension.

    nvcc compiles the .cu files into one shared library; torch's extension builder compiles
    the binding against it (it includes no CUDA header, so any torch builds it).
    """
    from torch.utils import cpp_extension

    compiler = compiler_for(plan.arch)
    plan.directory.mkdir(parents=True, exist_ok=True)
    with open(plan.directory / ".lock", "w") as lock:  # other processes may build it too
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not plan.library.exists():
            workers = max(1, min(len(plan.sources), os.cpu_count() or 1))
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda s: _run(plan.compile_command(s, compiler)), plan.sources))
            tmp = plan.library.with_suffix(".tmp")
            _run(plan.link_command(tmp, compiler))
            tmp.replace(plan.library)  # complete or absent, never half-written
        try:
            return cpp_extension.load(
                name=plan.module_name,
                sources=[str(plan.binding)],
                extra_cflags=["-O2", *(["-DMUXSERVE_EMULATION"] if plan.arch == EMULATED else [])],
                extra_include_paths=[str(CSRC)],
                extra_ldflags=[
                    f"-L{plan.directory}",
                    "-lmuxserve_cuda",
                    f"-Wl,-rpath,{plan.directory}",
                ],
                build_directory=str(plan.directory),
                with_cuda=False,
                verbose=verbose,
            )
        except (OSError, RuntimeError, ImportError) as e:
            raise KernelBuildError(f"building the torch binding failed: {e}") from e


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")


@functools.cache
def build_kernels(arch: str) -> ModuleType:
    """The kernels for one target, built (or found in the cache) once per process."""
    if shutil.which(compiler_for(arch)) is None:
        raise KernelBuildError(f"{compiler_for(arch)} is not on PATH")
    if arch != EMULATED:
        check_toolchain(toolchain())
    return build(build_plan(arch))


# ---- nvcc vs the driver vs torch -------------------------------------------------------------
Version = tuple[int, int]  # (major, minor) of a CUDA release


@dataclass(frozen=True)
class Toolchain:
    """The CUDA versions a build depends on; None where one cannot be found."""

    nvcc: Version | None  # the release of the nvcc on PATH: its runtime is linked in
    driver: Version | None  # the newest CUDA the driver runs (cuDriverGetVersion)
    torch: Version | None  # the CUDA torch was built with (torch.version.cuda)


def parse_nvcc_release(text: str) -> Version | None:
    """(major, minor) from `nvcc --version` ("Cuda compilation tools, release 12.4, V12.4.131")."""
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2])) if m else None


def parse_cuda_version(text: str | None) -> Version | None:
    """(major, minor) from torch.version.cuda ("12.4"), or None for a CPU build."""
    m = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)?", text or "")
    return (int(m[1]), int(m[2])) if m else None


def driver_cuda_version(libcuda: Any = None) -> Version | None:
    """The CUDA version the installed driver supports, e.g. (12, 4) for 12040; None without a
    driver. `cuDriverGetVersion` needs no `cuInit`, so this initialises nothing (an MPS client
    attaches at the first initialisation). `libcuda`: the driver library (tests pass a fake)."""
    if libcuda is None:
        try:
            libcuda = ctypes.CDLL("libcuda.so.1")
        except OSError:
            return None
    version = ctypes.c_int(0)
    if int(libcuda.cuDriverGetVersion(ctypes.byref(version))) != 0 or version.value <= 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def toolchain() -> Toolchain:
    """The versions on this machine: nvcc on PATH, the driver, torch."""
    try:
        nvcc = parse_nvcc_release(_version("nvcc"))
    except KernelBuildError:
        nvcc = None
    return Toolchain(nvcc, driver_cuda_version(), parse_cuda_version(torch.version.cuda))


def check_toolchain(tc: Toolchain) -> None:
    """KernelBuildError where the kernels, once built, could not run next to this driver and
    torch; nothing where they can (or a version is unknown: the launch probe still checks).

    - nvcc's major version above the driver's: the static runtime needs a newer driver, and
      every launch fails with CUDA error 35 (insufficient driver). A newer minor version in
      the same major is fine (minor version compatibility; we build SASS, no PTX to JIT).
    - nvcc's major version other than torch's: two CUDA runtimes of different major versions
      in one process, exchanging streams; we do not run that.
    """
    if tc.nvcc is None:
        return
    nvcc = f"{tc.nvcc[0]}.{tc.nvcc[1]}"
    if tc.driver is not None and tc.nvcc[0] > tc.driver[0]:
        raise KernelBuildError(
            f"nvcc {nvcc} builds for CUDA {tc.nvcc[0]}, but the driver runs CUDA up to "
            f"{tc.driver[0]}.{tc.driver[1]}: every kernel launch would fail (CUDA error 35); "
            f"put an nvcc {tc.driver[0]}.x first on PATH or update the driver"
        )
    if tc.torch is not None and tc.nvcc[0] != tc.torch[0]:
        raise KernelBuildError(
            f"nvcc {nvcc} and torch's CUDA {tc.torch[0]}.{tc.torch[1]} differ in major version: "
            f"put an nvcc {tc.torch[0]}.x first on PATH (torch.version.cuda)"
        )
