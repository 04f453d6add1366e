"""Dataset builders that ship with vit_jax.

The builders are imported lazily so that importing this package does not pull
in TensorFlow: only :mod:`vit_jax.input_pipeline` and the modules of this
package import TensorFlow / TFDS.

Available builders:

* ``digits`` (:mod:`vit_jax.datasets.digits`): scikit-learn's bundled 8x8
  handwritten digits, upsampled to 32x32x3. Prepared locally from files that
  come with scikit-learn, so it works without network access; it is the
  default dataset of the configs and of the tests.

`prepared_builder` prepares one on first use under a lock
(`DATA_DIR/<name>/.prepare.lock`, see :mod:`vit_jax.workdir_lock`): two runs
starting at once on a fresh ``data_dir`` take turns, and the second finds the
dataset ready instead of colliding with the first's half-written files.
"""

import importlib.util
import os
import sys

EMBEDDED_DATASETS = ('digits',)


def ensure_importlib_resources() -> None:
  """Lets TFDS work when the `importlib_resources` backport is not installed.

  TFDS 4.9.x looks up `importlib_resources.abc.Traversable` while locating a
  builder's source code (every `download_and_prepare` does), but recent
  `etils` releases no longer install that backport. The standard library's
  `importlib.resources` (Python >= 3.11) has the same class, so it stands in
  for the backport when the latter is missing. Call before using TFDS.
  """
  if importlib.util.find_spec('importlib_resources') is None:
    from importlib import resources  # pylint: disable=g-import-not-at-top
    from importlib.resources import abc  # pylint: disable=g-import-not-at-top,unused-import
    sys.modules.setdefault('importlib_resources', resources)


def get_builder(name: str, data_dir: str | None = None):
  """Returns a TFDS builder for one of :data:`EMBEDDED_DATASETS`."""
  if name == 'digits':
    from vit_jax.datasets import digits  # pylint: disable=g-import-not-at-top
    return digits.Digits(data_dir=data_dir)
  raise ValueError(
      f'Unknown embedded dataset {name!r}; known: {EMBEDDED_DATASETS}.')


def prepared_builder(name: str, data_dir: str | None = None, *,
                     timeout: float = 3600.0) -> 'tensorflow_datasets.core.DatasetBuilder':
  """`get_builder(name, data_dir)`, prepared (once, under a lock) if it was not."""
  builder = get_builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  from vit_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  # One level above the version directory: TFDS writes `incomplete.*` siblings
  # of it there and renames one into place, which is what two writers collide on.
  lock_dir = os.path.dirname(builder.data_dir)
  lock = workdir_lock.DirectoryLock(lock_dir, '.prepare.lock', purpose=f'preparation of {name}')
  lock.acquire(wait=True, timeout=timeout)
  try:
    builder = get_builder(name, data_dir=data_dir)  # Another process may have prepared it.
    if not builder.is_prepared():
      builder.download_and_prepare()  # Local: reads files that ship with the package.
  finally:
    lock.release()
  return get_builder(name, data_dir=data_dir)
