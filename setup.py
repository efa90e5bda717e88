from setuptools import find_packages, setup

setup(
    name="grao-kernels",
    version="0.1.0",
    description="Fused Triton kernels and a thin trainer for GRAO (Group Relative Alignment Optimization) "
                "training of language models on one GPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["grao", "grao.*", "grao_kernels", "grao_kernels.*"]),
    package_data={"grao": ["data/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "transformers>=4.45",
        "pyyaml",
    ],
    extras_require={
        "bench": ["pytest-benchmark", "matplotlib"],
        # Peers the benchmarks compare against (both need only torch and triton).
        "peers": ["liger-kernel==0.8.5", "cut-cross-entropy==25.1.1"],
        # The adapter overrides private GRPOTrainer methods: versions tested 1.0 to 1.16.
        "trl": ["trl>=1.0,<1.17"],
        "dev": ["pytest", "hypothesis", "ruff", "pytest-benchmark", "matplotlib", "accelerate>=1.1"],
        "flash": ["flash-attn"],
        # LoRA adapters in grao train (--lora-r); imported only when LoRA is asked for. Tested with 0.21.
        "lora": ["peft>=0.13"],
    },
    entry_points={"console_scripts": ["grao = grao.cli:main"]},
)
