"""The optional C kernels, built at install where a C compiler is, else skipped: the llama decode step
(toolkit/models/llama_cpu.c; without it `lmkit chat` runs the numpy step, and llama_cpu.py says which ran) and the
attractor's relaxation (toolkit/models/attractor/relax_cpu.c; without it the torch node). Everything else is in
pyproject.toml."""

import os
import sys

from setuptools import Extension, setup

# -march=native: the library is built on the machine that runs it (an install from source); LMKIT_CFLAGS overrides.
flags = os.environ.get("LMKIT_CFLAGS", "-O3 -march=native -fopenmp").split()
link = ["-fopenmp"] if "-fopenmp" in flags else []
if sys.platform == "win32":
    flags, link = ["/O2", "/openmp"], []

# the relaxation's sigmoids and clamps vectorise only without trapping math (2x its forward); neither flag lets the
# compiler reorder a sum, so the numbers stay the same
relax_flags = flags + ([] if sys.platform == "win32" else ["-fno-math-errno", "-fno-trapping-math"])
setup(ext_modules=[
    Extension("toolkit.models._llama_cpu", ["toolkit/models/llama_cpu.c"], extra_compile_args=flags,
              extra_link_args=link, optional=True),
    Extension("toolkit.models.attractor._relax_cpu", ["toolkit/models/attractor/relax_cpu.c"],
              extra_compile_args=relax_flags, extra_link_args=link, optional=True),
])
