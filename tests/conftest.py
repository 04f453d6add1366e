"""Test set-up: eight fake CPU devices, so multi-device code runs on any machine."""

import atexit
import os
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The [plan] extra installs libtpu and jaxlib's CUDA plugin (compile-only use by
# vit_jax.plan): keep every test process on the CPU so neither looks for its
# hardware, and let libtpu load in several processes at once.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# `import tensorflow` eagerly imports Keras 3's optimizers (~1.5 s of CPU in each of
# the suite's processes that read data); asked for the legacy tf_keras, which
# is not installed, TensorFlow skips that import. Nothing here uses Keras.
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# Most tests compile the same tiny models' steps, many in subprocesses: one
# persistent JAX compilation cache for the whole run (made by the controlling
# process, inherited by pytest-xdist's workers and every subprocess). With a size
# limit JAX takes a file lock around each read and write, so concurrent processes
# never see a half-written entry.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ and 'PYTEST_XDIST_WORKER' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='vit_jax_tests_jax_cache_')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(8 << 30)
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

# TFDS prepares the embedded digits on first use into its data dir. A private one
# per test process (pytest-xdist runs two) keeps concurrent preparations apart and
# leaves ~/tensorflow_datasets alone; subprocesses inherit it. Before TFDS is imported.
if 'TFDS_DATA_DIR' not in os.environ:
  _worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  os.environ['TFDS_DATA_DIR'] = tempfile.mkdtemp(prefix=f'vit_jax_tests_tfds_{_worker}_')
  atexit.register(shutil.rmtree, os.environ['TFDS_DATA_DIR'], ignore_errors=True)
