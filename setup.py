"""The optional C decode step (toolkit/models/llama_cpu.c): built at install where a C compiler is, else skipped
and `lmkit chat` runs the numpy step (toolkit/models/llama_cpu.py says which ran). Everything else is in
pyproject.toml."""

import os
import sys

from setuptools import Extension, setup

# -march=native: the library is built on the machine that runs it (an install from source); LMKIT_CFLAGS overrides.
flags = os.environ.get("LMKIT_CFLAGS", "-O3 -march=native -fopenmp").split()
link = ["-fopenmp"] if "-fopenmp" in flags else []
if sys.platform == "win32":
    flags, link = ["/O2", "/openmp"], []

setup(ext_modules=[Extension("toolkit.models._llama_cpu", ["toolkit/models/llama_cpu.c"], extra_compile_args=flags,
                             extra_link_args=link, optional=True)])
