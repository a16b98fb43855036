from setuptools import find_packages, setup

setup(
    name="nnunetv2-sa-umamba",
    version="0.1.0",
    description="SA-UMamba (Liu et al., PLoS One 2025) as an nnU-Net v2 plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunetv2_sa_umamba", "nnunetv2_sa_umamba.*",
                                    "dataset_conversion", "dataset_conversion.*"]),
    install_requires=[
        "torch>=2.4",
        "nnunetv2>=2.8.1",
        "einops",
        "SimpleITK",
        "batchgenerators",
        "dynamic-network-architectures",
        "numpy",
        "timm",
        "scipy",
        "tqdm",
        "Pillow",
        "tifffile",
        "h5py",
        "medpy",
    ],
    extras_require={
        # mamba-ssm compiles its CUDA kernels at install time; install torch with CUDA first.
        "cuda": ["mamba-ssm>=2.2.2"],
        # triton runs the fused kernels on the CPU in its interpreter for the tests (CUDA builds of torch ship it);
        # ruff is `make lint`'s linter (0.6.9 and 0.17.6 checked; a later minor version may add rules)
        "test": ["pytest", "triton>=3.0; platform_system == \"Linux\"", "ruff>=0.6,<0.18"],
    },
    entry_points={
        "console_scripts": [
            "saumamba_trainer_path=nnunetv2_sa_umamba.ext_trainers:print_path",
            "saumamba_demo=nnunetv2_sa_umamba.demo.run:main",
            "saumamba_evaluate=nnunetv2_sa_umamba.evaluation.paper_metrics:main",
            "saumamba_convert_synapse=dataset_conversion.synapse:main",
            "saumamba_convert_isic2017=dataset_conversion.isic:main_2017",
            "saumamba_convert_isic2018=dataset_conversion.isic:main_2018",
            "saumamba_convert_cvc=dataset_conversion.cvc_clinicdb:main",
            "saumamba_convert_checkpoint=nnunetv2_sa_umamba.checkpoints:main",
        ]
    },
)
