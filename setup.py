"""Builds lstm_ext._C against the installed torch: ``pip install --no-build-isolation .``

Without ``--no-build-isolation`` pip would compile against a torch of its own choosing, and the
extension would not load in the torch that is installed.
"""

import runpy
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).resolve().parent
# The source list and flags shared with the JIT build, read without importing the package.
build = runpy.run_path(str(ROOT / "lstm_ext" / "_extension.py"))
BENCH_REQUIRES = ["tqdm", "matplotlib", "numpy"]
ONNX_REQUIRES = ["onnx", "onnxscript", "onnxruntime"]  # export with both of torch.onnx's exporters, and run it

setup(
    name="lstm_ext",
    version="0.1.0",
    description="torch.nn.LSTM as a C++/ATen extension with a hand-written backward",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["lstm_ext"],
    install_requires=["torch"],
    extras_require={
        "bench": BENCH_REQUIRES,
        "onnx": ONNX_REQUIRES,
        # the engines bench_step.py times lstm_ext against for inference
        "peers": [*BENCH_REQUIRES, *ONNX_REQUIRES, "openvino"],
        # the suite smoke-tests the benchmark and runs the exported models in ONNX Runtime
        "test": ["pytest", "hypothesis", *BENCH_REQUIRES, *ONNX_REQUIRES],
    },
    ext_modules=[
        CppExtension(
            "lstm_ext._C",
            [str(Path(path).relative_to(ROOT)) for path in build["sources"](ROOT)],
            extra_compile_args=build["extra_cflags"](),
            extra_link_args=build["EXTRA_LDFLAGS"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
