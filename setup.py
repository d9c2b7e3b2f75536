from setuptools import setup

setup(
    name="rollingq",
    version="0.1.0",
    description="Fused Triton attention with RollingQ query rotation and per-modality attention statistics",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ lives at the top of the tree but installs as rollingq.kernels, so no top-level
    # `kernels` module lands in site-packages (a PyPI package of that name exists).
    packages=["rollingq", "rollingq.kernels"],
    package_dir={"rollingq": "rollingq", "rollingq.kernels": "kernels"},
    package_data={"rollingq": ["py.typed"]},  # PEP 561: type checkers read the package's own hints
    install_requires=["torch>=2.11", "triton>=3.6", "numpy"],
    extras_require={
        # Triton 3.6's interpreter (used by the CPU tests) breaks on NumPy 2.4's scalar conversion.
        # pytest-xdist: make test runs the interpreter tests on both cores of a CI machine.
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "numpy<2.4"],
        "plot": ["matplotlib"],
        "progress": ["tqdm"],
    },
)
