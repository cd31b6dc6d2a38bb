"""Install coconut-engine: the library, its Triton kernels (as coconut_engine.kernels) and the CLI."""
from setuptools import find_packages, setup

setup(
    name="coconut-engine",
    version="0.1.0",
    description="Training and serving engine for continuous-thought (Coconut) language models "
    "on a paged KV cache with Triton attention kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["coconut_engine", "coconut_engine.*"]) + ["coconut_engine.kernels"],
    # kernels/ sits at the top of the repository but must not install as a top-level package
    # named "kernels" (that name belongs to another PyPI package that transformers probes for).
    package_dir={"coconut_engine": "coconut_engine", "coconut_engine.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "transformers>=4.45",
        "numpy",
        "tqdm",
        "PyYAML",
    ],
    extras_require={"tensorboard": ["tensorboard"]},  # log_with: tensorboard
    entry_points={"console_scripts": ["coconut-engine=coconut_engine.cli:main"]},
)
