"""Where the compiled operators come from: the installed ``lstm_ext._C``, or a JIT build.

The C++ sources are listed once, in ``csrc/sources.txt``, and the compiler and linker flags once,
here; setup.py, CMakeLists.txt and :func:`load` all read both.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CSRC = REPO_ROOT / "csrc"
# OpenMP: the recurrent loop's threads are torch's OpenMP team (libgomp is already loaded by torch).
EXTRA_LDFLAGS = ["-fopenmp"]
# The baseline every x86-64 CPU runs: ATen's DEFAULT capability. The kernels of the wider
# instruction sets are compiled beside it (csrc/simd_avx2.cpp, simd_avx512.cpp set their own
# target) and chosen when the library loads (csrc/ops.cpp), so a build runs on any x86-64 CPU.
BASELINE_CFLAGS = ["-O3", "-fopenmp", "-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]


def extra_cflags() -> list[str]:
    """Compiler flags for every build path (the same on every machine: no -march of the builder)."""
    return list(BASELINE_CFLAGS)


def sources(root: Path = REPO_ROOT) -> list[str]:
    """The C++ sources of the extension, as paths under ``root``, in link order: the baseline
    files first, then the kernels from the narrowest instruction set to the widest (simd_*.cpp),
    so that the linker keeps the baseline copy of any inline function (a torch header's) that
    several of them compile, never one built for instructions the CPU may lack. The names sort
    in that order, as setuptools sorts the sources it links (tests/test_capabilities.py)."""
    names = (root / "csrc" / "sources.txt").read_text().split()
    return [str(root / "csrc" / name) for name in names]


def load(verbose: bool = False, **kwargs):
    """Build the extension from a source checkout with ``torch.utils.cpp_extension.load``.

    The build is cached by torch (``TORCH_EXTENSIONS_DIR``), so only the first call compiles.
    Extra keyword arguments go to ``torch.utils.cpp_extension.load``.
    """
    from torch.utils import cpp_extension

    if _operators_registered():
        # A second library would register the lstm_ext namespace again, which aborts the process.
        raise RuntimeError(
            "lstm_ext: the operators are already loaded in this process (import lstm_ext loads them); "
            "a fresh process whose `import lstm_ext` finds no compiled lstm_ext._C builds them itself"
        )
    if not (CSRC / "sources.txt").is_file():
        raise RuntimeError(
            f"lstm_ext: no C++ sources at {CSRC}; the JIT build needs a source checkout "
            "(or install the package with pip, which ships the compiled lstm_ext._C)"
        )
    kwargs.setdefault("name", "lstm_ext_jit")
    kwargs.setdefault("extra_cflags", extra_cflags())
    kwargs.setdefault("extra_ldflags", EXTRA_LDFLAGS)
    return cpp_extension.load(sources=sources(), verbose=verbose, **kwargs)


def _operators_registered() -> bool:
    import torch

    return hasattr(torch.ops.lstm_ext, "forward")


def import_operators():
    """Load the operators into the dispatcher: the prebuilt ``_C`` when present, else a JIT build."""
    # torch first: _C links against libc10 and libtorch, which the loader finds only once torch
    # has loaded them. Without it, `import lstm_ext` before `import torch` failed to import _C:
    # from a checkout it compiled a JIT build instead, and installed without sources it raised.
    import torch  # noqa: F401

    try:
        from lstm_ext import _C
    except ImportError as prebuilt_error:
        if not (CSRC / "sources.txt").is_file():
            raise
        try:
            return load()
        except Exception as jit_error:
            raise ImportError(
                f"lstm_ext: the compiled extension could not be imported ({prebuilt_error}) "
                f"and the JIT build failed ({jit_error})"
            ) from jit_error
    return _C
