from setuptools import find_packages, setup

setup(
    name="m2rnn",
    version="0.1.0",
    description="M2RNN (non-linear RNN with matrix-valued states) for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["modeling_m2rnn", "modeling_m2rnn.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "transformers>=5.17,<6",
        "triton>=3.6; platform_system == 'Linux'",
        "safetensors",
        "huggingface_hub",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "ruff", "accelerate", "peft", "datasets", "lm-eval[hf]>=0.4.13,<0.5"],
        "examples": ["tqdm", "matplotlib", "datasets", "accelerate", "peft"],
        # Gated DeltaNet's CUDA kernels. fla-core itself needs only einops: it pulls no torch (nor a CUDA build).
        "fla": ["fla-core"],
        # lm-evaluation-harness; its `hf` extra asks for torch>=1.8, which the torch already installed satisfies
        "eval": ["lm-eval[hf]>=0.4.13,<0.5"],
    },
)
