"""Every instruction set the build contains, forced on this machine.

lstm.cpp is compiled once per capability of ATen's (csrc/kernels.cpp, simd_*.cpp) and the library picks
the best the CPU has when it loads (csrc/ops.cpp). The rest of the suite runs that one; here the
kernel-facing tests run again in a fresh process for each lower capability, forced with
ATEN_CPU_CAPABILITY as ATen's own kernels are. A capability above this CPU's cannot run here
(it would fault on the first wider instruction): on an AVX2 machine the AVX-512 kernels are
built but run only where the CPU has AVX-512.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lstm_ext
from lstm_ext._extension import sources as build_sources

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ["DEFAULT", "AVX2", "AVX512"]
BEST = torch.backends.cpu.get_cpu_capability()
# The tests that reach every kernel path: products (packed, weight-major, dot products, the
# transposed weight gradients), whole layers, steps, packed input, bfloat16/float16 and quantized weights.
KERNEL_TESTS = ["test_products.py", "test_lstm_parity.py", "test_step.py", "test_packed.py", "test_autocast.py",
                "test_quantized.py"]


def test_every_build_links_the_baseline_first():
    """setuptools links a pip build's objects sorted by name, the JIT build and CMake in the listed
    order: both must put every baseline file before the wider kernels (narrow to wide), or the
    linker may keep a wide copy of an inline function that baseline code then calls."""
    names = [Path(path).name for path in build_sources()]
    assert names == sorted(names)
    wide = [name for name in names if name.startswith("simd_")]
    assert wide == ["simd_avx2.cpp", "simd_avx512.cpp"] and names[-len(wide):] == wide


def test_the_best_capability_runs_by_default():
    assert lstm_ext._C.kernels_capability() == BEST


@pytest.mark.parametrize("level", [level for level in LEVELS if LEVELS.index(level) < LEVELS.index(BEST)])
def test_kernel_tests_pass_at_a_lower_capability(level):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level.lower()}
    probe = "import lstm_ext; print(lstm_ext._C.kernels_capability())"
    chosen = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
                            check=True)
    assert chosen.stdout.strip() == level
    tests = [str(ROOT / "tests" / name) for name in KERNEL_TESTS]
    # Not torch.compile: Inductor's generated C++ does not build with ATen forced below the CPU's
    # capability (at::vec undeclared), whatever the operator.
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not compile",
                             *tests], env=env, cwd=ROOT, capture_output=True, text=True)
    summary = [line for line in result.stdout.splitlines() if "passed" in line or "failed" in line or "FAILED" in line]
    assert result.returncode == 0, "\n".join(summary) + result.stderr[-2000:]
