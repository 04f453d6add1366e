"""Command line: `python -m vit_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden on the command line
(`--config.total_steps=500 --config.learning_rate=0.01`), and configs that
take an argument get it after a colon
(`--config=configs/finetune_cifar10.py:ViT-L_16`).

Multi-process runs: pass `--coordinator_address=host:port --num_processes=N
--process_id=i` to every process, or nothing on a cluster that JAX detects by
itself (SLURM, Open MPI, Cloud TPU; or set `--multiprocess` to make it try).
Rerunning with the same `--workdir` resumes from the latest checkpoint. Exit
status 143 means the run was stopped by SIGTERM (or a multi-process preemption
notice), 130 by Ctrl-C (SIGINT), after saving a checkpoint; a second Ctrl-C exits
with 130 at once.

One run per workdir: the run holds an exclusive lock on `WORKDIR/.lock`
(vit_jax.workdir_lock), taken here before the slow imports when the workdir
exists already, so a second run on it exits at once.

User errors (a bad config value, a missing file or dataset, an unreadable
image, a workdir in use, a full disk, a non-finite loss) print one line,
`error: ...`, and exit with status 2; `--verbose` or `VIT_JAX_TRACEBACK=1` also
prints the traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging as std_logging
import os
import sys
import traceback
from typing import Iterator

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax import cli


FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    'config', None, 'Training config file (configs/*.py[:argument]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and event files go.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for multi-process runs.')
flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
flags.DEFINE_integer('process_id', None, 'Index of this process, 0 .. num_processes-1.')
flags.DEFINE_bool('multiprocess', False,
                  'Join a multi-process run described by the cluster environment.')
flags.DEFINE_string('platform', None, "Force a JAX platform ('cpu', 'gpu', 'tpu').")
flags.DEFINE_bool('retain_host_memory', False,
                  'Keep freed host memory for reuse (glibc) and run CPU steps one at a time, '
                  'so XLA:CPU steps do not fault in their large buffers anew: faster CPU '
                  'training of ViT-S and larger, slower for tiny models (one malloc arena '
                  'for all threads); see vit_jax/host_memory.py.')
flags.DEFINE_bool('verbose', False,
                  'On an error, also print its traceback (as VIT_JAX_TRACEBACK=1 does).')
flags.DEFINE_bool('dry_run', False,
                  'Parse the flags and the config with its overrides, resolve the run (config '
                  'and mesh), print it in two lines and exit: no device, process group, '
                  'dataset or workdir is touched (checks a cluster launch command anywhere).')

def _wants_distributed() -> bool:
  if FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
    return True
  if FLAGS.multiprocess:
    return True
  if os.environ.get('SLURM_NTASKS', '1') not in ('', '1'):
    return True
  return int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1


class _DropLibraryInfo(std_logging.Filter):
  """Keeps Orbax's per-save INFO chatter out of the console; its warnings still show."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def _is_user_error(error: BaseException) -> bool:
  """Errors whose message says what to change: shown without a traceback."""
  return cli.is_user_error(error)



def _quiet_after_failed_writes() -> None:
  """Silences what Orbax's asyncio writers print once a save has failed.

  After a failed (e.g. disk-full) write, TensorStore's callbacks find the event
  loop of that save closed and print `RuntimeError: Event loop is closed` through
  sys.excepthook or, from a callback with no frame to raise into, sys.unraisablehook;
  and the unfinished write coroutines are reported at exit: dozens of
  tracebacks around the one line that matters.
  """
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def loop_closed(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'

  def filtered_excepthook(kind, value, tb):
    if loop_closed(value):
      return
    excepthook(kind, value, tb)

  def filtered_unraisablehook(unraisable):
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    if any('/orbax/' in frame.filename for frame in frames):
      return
    # A TensorStore completion posted to the closed loop: no orbax frame on its stack.
    if loop_closed(unraisable.exc_value):
      return
    unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = filtered_excepthook, filtered_unraisablehook


def _exit_if_storage_down(status: int) -> None:
  """Exits now when the workdir's bucket stopped answering during a save.

  The failed save's writer threads wait minutes for a directory that will never
  be created (Orbax's own timeout); the run has stopped and said why.
  """
  storage = sys.modules.get('vit_jax.storage')
  if storage is not None and storage.is_down(FLAGS.workdir):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access


def _check_workdir(workdir: str) -> None:
  """A local workdir must be a writable directory; a bucket one takes a probe object."""
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  if storage.is_remote(workdir):
    storage.probe_writable(workdir, '--workdir')
  else:
    cli.check_writable_dir(workdir, '--workdir')


@contextlib.contextmanager
def _workdir_locked_early(workdir: str) -> Iterator[None]:
  """The workdir's lock, if the workdir exists, before JAX and TensorFlow load.

  `train_and_evaluate` takes it again (nested, for API users); taking it here as
  well refuses a second run within a second or two instead of after the imports.
  Multi-process runs leave it to process 0 there.
  """
  from vit_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  early = ((storage.is_remote(workdir) or os.path.isdir(os.path.expanduser(workdir)))
           and not _wants_distributed())
  with workdir_lock.hold(workdir, enabled=early):
    yield


def main(argv):
  logging.get_absl_handler().addFilter(_DropLibraryInfo())
  if len(argv) > 1:
    cli.refuse_positional(argv[1:])
  if FLAGS.config is None or FLAGS.workdir is None:
    sys.exit(cli.report_user_error(
        cli.UserError('--config and --workdir are required (see --help)')))
  if FLAGS.dry_run:
    try:
      print(_dry_run(_resolved_config()))
    except Exception as e:  # pylint: disable=broad-except
      if not _is_user_error(e):
        raise
      sys.exit(cli.report_user_error(e, FLAGS.verbose))
    return
  try:  # Before the slow imports: a file or a read-only directory cannot hold a run.
    _check_workdir(FLAGS.workdir)
  except (cli.UserError, OSError) as e:
    if not _is_user_error(e) and not isinstance(e, cli.UserError):
      raise
    sys.exit(cli.report_user_error(e, FLAGS.verbose))
  _quiet_after_failed_writes()

  fresh = ('://' not in FLAGS.workdir  # a bucket workdir has no directory to remove
           and not os.path.exists(os.path.expanduser(FLAGS.workdir)))
  try:
    with _workdir_locked_early(FLAGS.workdir):
      metrics = _run()
  except KeyboardInterrupt:  # Ctrl-C outside the training steps (which save first)
    print('error: Interrupted (Ctrl-C) outside the training steps; the checkpoints saved '
          'so far are intact.', file=sys.stderr)
    sys.exit(_SIGNAL_STATUS['SIGINT'])
  except Exception as e:  # pylint: disable=broad-except
    if not _is_user_error(e):
      raise
    if fresh:
      _remove_unstarted(FLAGS.workdir)
    status = cli.report_user_error(e, FLAGS.verbose)
    _exit_if_storage_down(status)
    sys.exit(status)
  if metrics.get('preempted'):
    stopped_by = metrics.get('stopped_by', 'SIGTERM')
    print(f'error: Stopped by {stopped_by} at step {metrics["step"]} after saving a checkpoint '
          f'in {metrics.get("checkpoint_dir", FLAGS.workdir)}; rerun the same command to resume.',
          file=sys.stderr)
    sys.exit(_SIGNAL_STATUS.get(stopped_by, 143))


def _remove_unstarted(workdir: str) -> None:
  """Removes the workdir a refused fresh run made, if it holds nothing but the run's lock
  file and empty directories (no checkpoint, metric or event file was written)."""
  from vit_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = os.path.expanduser(workdir)
  if not os.path.isdir(workdir):
    return
  for root, _, files in os.walk(workdir):
    if any(name != workdir_lock.LOCK_NAME or root != workdir for name in files):
      return
  for root, dirs, files in os.walk(workdir, topdown=False):
    for name in files:
      os.remove(os.path.join(root, name))
    for name in dirs:
      os.rmdir(os.path.join(root, name))
  os.rmdir(workdir)


# 128 + the signal's number, as a shell reports a process a signal ended.
_SIGNAL_STATUS = {'SIGINT': 130, 'SIGTERM': 143, 'preemption': 143}


def _resolved_config():
  """`--config`, resolved: the one `schema.resolve` of this command."""
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  return schema.resolve(FLAGS.config)


def _dry_run(config) -> str:
  """The resolved run in two lines, for `--dry_run`.

  The number of devices is not known without starting the accelerators (and
  joining the other processes), so an axis of size -1 is shown as the rest of
  the devices; the other sizes and the axis names are checked.
  """
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  spec = parallel.FSDP_MESH if config.fsdp else tuple(config.mesh or parallel.DEFAULT_MESH)
  fixed = 1
  for axis in spec:  # malformed axes are refused by resolve_mesh below
    size = axis[1] if isinstance(axis, (tuple, list)) and len(axis) == 2 else None
    if isinstance(size, int) and size > 0:
      fixed *= size
  sizes = parallel.resolve_mesh(config.mesh, fixed, fsdp=config.fsdp)
  free = {axis[0] for axis in spec if axis[1] == -1}
  mesh = ' x '.join(f'{name}=' + ('rest' if name in free else str(size))
                    for name, size in sizes.items())
  if FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
    processes = (f'process {FLAGS.process_id} of {FLAGS.num_processes}, coordinator '
                 f'{FLAGS.coordinator_address}')
  elif _wants_distributed():
    processes = ('processes from the cluster environment (jax.distributed: SLURM, Open MPI, '
                 'Cloud TPU)')
  else:
    processes = 'one process'
  return (f'dry run: {config.model_name} on {config.dataset}, {config.total_steps} steps of '
          f'batch {config.batch_size}, mesh {mesh}'
          f'{" (rest: the devices the other axes leave)" if free else ""}\n'
          f'dry run: {processes}; workdir {FLAGS.workdir}; nothing was started')


def _run() -> dict:
  if FLAGS.retain_host_memory:
    # Before JAX starts its threads: they pick their malloc arena on first use.
    from vit_jax import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.retain_freed_memory()

  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.platform:
    jax.config.update('jax_platforms', FLAGS.platform)
  if _wants_distributed():
    from vit_jax import parallel  # pylint: disable=g-import-not-at-top
    if (FLAGS.platform or os.environ.get('JAX_PLATFORMS', '')).startswith('cpu'):
      try:  # Collectives across CPU processes (the default in recent JAX).
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      except (AttributeError, KeyError, ValueError):
        pass
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)

  from vit_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s).',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.default_backend())
  config = _resolved_config()
  return train.train_and_evaluate(config, FLAGS.workdir,
                                  on_start=lambda resolved: _write_config(resolved, FLAGS.workdir))


def _write_config(resolved, workdir: str) -> None:
  """The resolved config (every field, defaults included) as WORKDIR/config.json."""
  import json  # pylint: disable=g-import-not-at-top
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  path = storage.join(storage.resolve(workdir), 'config.json')
  storage.write_text(path, json.dumps(resolved.to_dict(), indent=1, sort_keys=True,
                                      default=str) + '\n')
  logging.info('Config: %s (model %s, dataset %s, %d steps of batch %d)', path,
               resolved.model_name, resolved.dataset, resolved.total_steps, resolved.batch_size)


if __name__ == '__main__':
  cli.quiet_console()  # before TensorFlow and JAX load
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main, flags_parser=cli.parse_absl_flags)

