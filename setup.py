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
    # the Makefile installs these as TEST_DEPS; the packages after hypothesis are compared with our mechanisms
    extras_require={"test": ["pytest", "hypothesis", "performer-pytorch==1.1.4", "linformer==0.2.3",
                             "isab-pytorch==0.3.0", "memory-compressed-attention==0.0.7", "reformer-pytorch==1.4.4",
                             "sinkhorn-transformer==0.11.4", "routing-transformer==1.6.1"]},
    entry_points={"console_scripts": ["lite = lite.cli:main"]},
)
