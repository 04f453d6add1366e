"""Installs the `vit_jax` package.

Version ranges say what the code supports; `constraints.txt` pins one set that
installs together on Python 3.11 (`pip install -c constraints.txt -e .`).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'absl-py>=2.1',
    'chex>=0.1.90',
    'flax>=0.12.0,<0.13',
    'jax>=0.10.0,<0.12',
    'ml_collections>=1.0',
    'numpy>=1.26',
    'optax>=0.2.5',
    'orbax-checkpoint>=0.12.0',
    'pillow>=10.0',
    'matplotlib>=3.8',
    'scikit-image>=0.24,<0.27',  # skimage:NAME photos of visualize, the docs and the notebook
    'scikit-learn>=1.5',  # ships the embedded default dataset (digits)

    'scipy>=1.11',  # position-embedding resampling as the reference does it
    'tensorboard>=2.16',  # event files; its writer needs no TensorFlow
    'tensorflow-cpu>=2.18; platform_machine == "x86_64"',
    'tensorflow>=2.18; platform_machine != "x86_64"',
    'tensorflow-datasets>=4.9.6',
    # gs:// workdirs and checkpoints (vit_jax.storage): etils epath's client for
    # Cloud Storage, the bucket lock and ranged reads; Orbax's arrays go through
    # tensorstore, which it pulls in itself.
    'gcsfs>=2024.2',
    'importlib_resources>=6.0',  # imported by TFDS when it prepares a dataset
]

# The TPU and GPU compilers, used compile-only by `python -m vit_jax.plan`: libtpu
# (jax[tpu]) and jaxlib's CUDA plugin with ptxas / libdevice. Both stay idle in a
# process that runs with JAX_PLATFORMS=cpu, as vit_jax.plan does.
PLAN = [
    'jax[tpu]>=0.10.0,<0.12',
    'jax-cuda13-plugin>=0.10.0,<0.12',
    'nvidia-cuda-nvcc>=13.0',
    'nvidia-nvvm>=13.0',
]

EXTRAS_REQUIRE = {
    # Test-time references only: the package never imports torch.
    'test': [
        'pytest>=8.0',
        'pytest-xdist>=3.5',  # the suite runs on both cores (pyproject addopts)

        'torch>=2.6',
        'torchvision>=0.21',
        'timm>=1.0',
        'transformers>=4.45',
        'nbclient>=0.10',
        'nbformat>=5.10',
        'ipykernel>=6.29',
        'psutil>=5.9',
        'gcp-storage-emulator>=2024.8',  # a local Cloud Storage for tests/test_gcs.py
        # vit_jax.export's tests: the exporter and the runtime that checks its files.
        'onnx>=1.18',
        'onnxscript>=0.5',
        'onnxruntime>=1.22',
        *PLAN,  # tests/test_plan.py compiles for a TPU topology and GPU nodes
    ],
    # vit_jax.export --format onnx: the model rebuilt in timm, written by
    # torch.onnx (its dynamo exporter needs onnxscript), checked by onnxruntime.
    # (--format stablehlo needs nothing beyond jax.)
    'export': [
        'torch>=2.6',
        'timm>=1.0',
        'onnx>=1.18',
        'onnxscript>=0.5',
        'onnxruntime>=1.22',
    ],
    # vit_jax.plan: compile-only TPU and GPU targets on a CPU machine.
    'plan': PLAN,
    # Accelerator builds of jaxlib; install one of these instead of the CPU default.
    'gpu': ['jax[cuda12]>=0.10.0,<0.12'],
    'tpu': ['jax[tpu]>=0.10.0,<0.12'],
}

setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformer (ViT) and BiT ResNet in JAX/Flax: train, fine-tune, load published checkpoints.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['vit_jax', 'vit_jax.*']),
    package_data={'vit_jax': ['data/*.txt']},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
