from setuptools import find_packages, setup

setup(
    name="lite-mt",
    version="0.1.0",
    description="Lite transformer translation models: fairseq training, budgets, compression, ONNX export",
    packages=find_packages(include=["lite", "lite.*", "export", "export.*", "compress", "compress.*",
                                    "eval", "eval.*"]),
    python_requires=">=3.10",
    # torch and fairseq are installed by the Makefile (CPU wheel; fairseq with --no-deps)
    install_requires=["sentencepiece", "sacrebleu", "pyyaml", "numpy", "tqdm", "torchprofile", "torch-pruning",
                      "onnx>=1.16", "onnxruntime>=1.20", "onnxslim", "ctranslate2>=4.7",
                      "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis"]},  # the Makefile installs these as TEST_DEPS
    entry_points={"console_scripts": ["lite = lite.cli:main"]},
)
