"""Builds the native pool extension (beluga_native). Metadata lives in pyproject.toml."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "beluga_native",
    ["native/src/pool.cpp", "native/src/bindings.cpp"],
    include_dirs=["native/include"],
    cxx_std=17,
    extra_compile_args=["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
