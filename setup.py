from setuptools import find_packages, setup

setup(
    name="largewave",
    version="0.1.0",
    description="Train stacked autoregressive discrete autoencoders on raw audio at cluster scale",
    packages=[*find_packages(include=["largewave", "largewave.*"]), "largewave.configs"],
    # the shipped stack configs: the checkout's configs/ installed as largewave/configs/
    package_dir={"largewave.configs": "configs"},
    package_data={
        "largewave": ["models/kernels/*.c"],  # the fused generation step's C source, compiled on first use
        "largewave.configs": ["*.yaml"],
    },
    entry_points={"console_scripts": ["largewave = largewave.cli:main"]},
    python_requires=">=3.10",
    install_requires=[
        # A range that the CPU wheel 2.13.0 satisfies; install torch==2.13.0 first (see README).
        "torch>=2.4,<2.15",
        # upper bounds: the next major/minor releases are untested; constraints.txt has the tested set
        "deepspeed>=0.16,<0.20",
        "webdataset>=0.2.100,<1.1",
        "wandb>=0.19,<0.32",  # 0.19: define_metric summaries, WANDB_X_DISABLE_STATS
        "boto3>=1.28",  # s3:// shard sets
        "submitit>=1.5",
        "soundfile>=0.12",
        "soxr>=0.3",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "pillow>=9",  # spectrogram images for W&B
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2.1", "pytest-random-order>=1.1",
                "moto[server]>=5.0"],  # a real S3-compatible server on loopback for the storage tests
        # bench/sampling.py's public baseline; install it with --no-deps (it needs only torch + numpy):
        #   pip install --no-deps wavenet-vocoder==0.1.1
    },
)
