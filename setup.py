"""Builds the native pool extension (beluga_native). Metadata lives in pyproject.toml.

Where a CUDA toolkit is found (nvcc in $CUDA_HOME/bin, /usr/local/cuda/bin or on PATH), the
GPU copy path (native/cuda/*.cu) is compiled with nvcc and linked in, statically against
cudart, so the module imports on machines without a driver; without nvcc it is left out and
the GPU methods raise PoolCudaError. BELUGA_BUILD_CUDA=0 forces it out, =1 makes a missing
toolkit an error. BELUGA_SANITIZE=1 builds with AddressSanitizer + UndefinedBehaviorSanitizer
(scripts/sanitize.sh; never for a normal install).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).resolve().parent
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "native/cuda").glob("*.cu"))
# Ampere, Hopper, Blackwell SASS + PTX for anything newer.
CUDA_ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
              "-gencode=arch=compute_100,code=sm_100", "-gencode=arch=compute_100,code=compute_100"]


def find_nvcc() -> str | None:
    want = os.environ.get("BELUGA_BUILD_CUDA", "auto")
    if want == "0":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [Path(home) / "bin/nvcc", Path(shutil.which("nvcc") or "/nonexistent")]
    nvcc = next((str(p) for p in candidates if p.is_file()), None)
    if nvcc is None and want == "1":
        raise RuntimeError("BELUGA_BUILD_CUDA=1 but no nvcc found (set CUDA_HOME)")
    return nvcc


class BuildExt(build_ext):  # type: ignore[misc]
    """Compiles the .cu sources with nvcc first, then links their objects in."""

    def build_extension(self, ext: Pybind11Extension) -> None:
        nvcc = find_nvcc()
        if nvcc is not None and CUDA_SOURCES:
            cuda_home = Path(nvcc).resolve().parent.parent
            out = Path(self.build_temp) / "cuda"
            out.mkdir(parents=True, exist_ok=True)
            for src in CUDA_SOURCES:
                obj = out / (Path(src).stem + ".o")
                cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17",
                       "-Inative/include", "-Xcompiler", "-fPIC", *CUDA_ARCHS]
                self.announce(" ".join(cmd), level=2)
                subprocess.run(cmd, check=True, cwd=ROOT)
                ext.extra_objects.append(str(obj))
            ext.define_macros.append(("BELUGA_WITH_CUDA", "1"))
            ext.include_dirs.append(str(cuda_home / "include"))
            ext.library_dirs.append(str(cuda_home / "lib64"))
            ext.libraries.extend(["cudart_static", "dl", "rt", "pthread"])
        super().build_extension(ext)


WARNINGS = ["-Wall", "-Wextra", "-Wno-unused-parameter"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer"]
sanitize = os.environ.get("BELUGA_SANITIZE") == "1"
ext = Pybind11Extension(
    "beluga_native",
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "native/src").glob("*.cpp")),
    include_dirs=["native/include"],
    cxx_std=17,
    extra_compile_args=(["-O1", "-g", *SANITIZE] if sanitize else ["-O3"]) + WARNINGS,
    extra_link_args=SANITIZE if sanitize else [],
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
