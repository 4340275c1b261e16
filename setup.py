"""Builds lstm_ext._C against the installed torch: pip install --no-build-isolation ."""

import runpy
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent


def read_build_settings():
    """sources() and EXTRA_CFLAGS from lstm_ext/_extension.py, without importing the package."""
    return runpy.run_path(str(ROOT / "lstm_ext" / "_extension.py"))


settings = read_build_settings()
setup(
    ext_modules=[
        CppExtension(
            "lstm_ext._C",
            [str(Path(path).relative_to(ROOT)) for path in settings["sources"](ROOT)],
            extra_compile_args=settings["EXTRA_CFLAGS"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
