"""What every command line of the package shares: user errors in one line, a quiet console.

A user error (a bad flag or config value, a missing or unreadable file, a read-only
or full disk, a checkpoint of another model, an image too large) is reported the same
way by every command (`vit_jax.main`, `evaluate`, `predict`, `convert`, `visualize`,
`compare`, `export`, `plan`): exactly one line `error: <what is wrong and what to
change>` on stderr and exit status 2, no traceback; `--verbose` or
`VIT_JAX_TRACEBACK=1` prints the traceback too. Anything else (a bug) keeps its
traceback and Python's exit status 1.

Using it in a command module:

    def main(argv=None) -> int:              # argparse commands
      args = cli.ArgumentParser(prog='python -m vit_jax.NAME', ...).parse_args(argv)
      ...                                    # raise cli.UserError('...') to refuse
      return 0

    if __name__ == '__main__':
      cli.quiet_console()                    # before TensorFlow / JAX are imported
      sys.exit(cli.run(main))

`run(main)` calls `main(argv)` and turns what `is_user_error` accepts, and a
`SystemExit('message')`, into the one line. Inside a command,
`report_user_error(error, verbose)` prints it and returns 2. absl commands pass
`flags_parser=cli.parse_absl_flags` to `absl.app.run`, which reports a bad flag,
an unknown `--config.FIELD` or a config file that fails to load in one line too.
`check_writable_dir(path, flag)` refuses an output directory that is a file or
cannot be written, before any work is done.

This module imports only the standard library (and absl when parsing absl flags),
so an error found before JAX or TensorFlow load costs no import time.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import os
import re
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

TRACEBACK_ENV = 'VIT_JAX_TRACEBACK'
USER_ERROR_STATUS = 2

# OSErrors that are about the user's files or machine, not about the code.
_USER_ERRNOS = frozenset({
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
    errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG,
    errno.ENOTEMPTY, errno.EXDEV, errno.ELOOP})

# Rows of a multi-line message kept in its one-line form.
_MAX_ROWS = 3


class UserError(ValueError):
  """A refusal whose message says what to change; reported without a traceback."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one `error: ...` line and exit status 2."""

  def error(self, message: str) -> NoReturn:
    print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
    sys.exit(USER_ERROR_STATUS)


def wants_traceback(verbose: bool = False) -> bool:
  return bool(verbose) or os.environ.get(TRACEBACK_ENV, '') not in ('', '0')


def is_user_error(error: BaseException) -> bool:
  """Whether `error`'s message tells the user what to change (shown without a traceback)."""
  storage_error = getattr(sys.modules.get('vit_jax.storage'), 'StorageError', None)
  if storage_error is not None and isinstance(error, storage_error):
    return True  # an OSError (EIO) whose message names the bucket and what failed
  if isinstance(error, OSError):
    return error.errno in _USER_ERRNOS or isinstance(
        error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))
  if isinstance(error, (ValueError, MemoryError, ImportError)):
    return True
  # Errors of modules that may not be imported (then not raised either).
  for module, name in (('vit_jax.workdir_lock', 'WorkdirLockedError'),
                       ('vit_jax.periodic', 'NonFiniteLossError')):
    kind = getattr(sys.modules.get(module), name, None)
    if kind is not None and isinstance(error, kind):
      return True
  return False


def _format_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} TiB'


def _os_error_message(error: OSError) -> Optional[str]:
  path = error.filename
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    if not path:
      return 'No space left on device'
    free = ''
    try:
      import shutil  # pylint: disable=g-import-not-at-top
      free = f' ({_format_bytes(shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free)}' \
             ' free there)'
    except OSError:
      pass
    return f'No space left on device writing {path!r}{free}'
  if error.strerror and path:
    other = f' -> {error.filename2!r}' if error.filename2 else ''
    return f'{error.strerror}: {path!r}{other}'
  return None


def _one_line(message: str) -> str:
  """A multi-line message as one line: its first rows, then how many more there are."""
  rows = [row.strip() for row in message.splitlines() if row.strip()]
  if len(rows) <= 1:
    return rows[0] if rows else ''
  head, rest = rows[0], rows[1:]
  shown = '; '.join(rest[:_MAX_ROWS])
  more = f'; ... {len(rest) - _MAX_ROWS} more (--verbose shows all)' if len(
      rest) > _MAX_ROWS else ''
  return f'{head} {shown}{more}'


def user_error_message(error: BaseException) -> str:
  """The one line (without `error: `) that reports `error` to a user.

  A full disk names the path and the free space left there; other OSErrors say
  what happened to which path; errors with a `one_line()` method (a checkpoint
  of another model) give that summary; other multi-line messages keep their
  first rows.
  """
  one_line = getattr(error, 'one_line', None)
  if callable(one_line):
    return one_line()
  if isinstance(error, OSError):
    message = _os_error_message(error)
    if message:
      return message
  return _one_line(str(error)) or type(error).__name__


def report_user_error(error: BaseException, verbose: bool = False) -> int:
  """Prints `error: <message>` to stderr (after the traceback when `verbose` or
  $VIT_JAX_TRACEBACK=1); returns 2, the exit status of user errors."""
  if wants_traceback(verbose):
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
  print(f'error: {user_error_message(error)}', file=sys.stderr, flush=True)
  return USER_ERROR_STATUS


def run(main_fn: Callable[[Sequence[str]], Any], argv: Optional[Sequence[str]] = None) -> int:
  """Runs a command's `main(argv)`; returns its exit status, 2 after a user error.

  `main_fn` may return an int (its status) or anything else (0). A user error
  (`is_user_error`) or `SystemExit('message')` becomes one `error:` line.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = '--verbose' in argv
  try:
    result = main_fn(argv)
  except SystemExit as e:
    if isinstance(e.code, str):
      return report_user_error(UserError(e.code), verbose)
    raise
  except Exception as e:  # pylint: disable=broad-except
    if not is_user_error(e):
      raise
    return report_user_error(e, verbose)
  return result if isinstance(result, int) and not isinstance(result, bool) else 0


def check_writable_dir(path: str, flag: str) -> str:
  """`path` (to be created if missing) as a directory this process can write.

  Raises UserError naming `flag` when it is a file, or when it (or, if it does
  not exist yet, its nearest existing parent) cannot be written: a read-only
  file system, a directory without write permission.
  """
  if not path:
    raise UserError(f'{flag} is empty: name a directory')
  path = os.path.expanduser(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'{flag} {path!r} is a file, not a directory')
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(os.path.abspath(probe))
    if parent == os.path.abspath(probe):
      break
    probe = parent
  if not os.path.isdir(probe):
    raise UserError(f'{flag} {path!r}: {probe!r} is a file, not a directory')
  if not os.access(probe, os.W_OK | os.X_OK):
    why = 'a read-only file system' if _read_only_fs(probe) else 'no write permission'
    where = '' if probe == path else f' (its parent {probe!r} exists)'
    raise UserError(f'{flag} {path!r} cannot be written: {why}{where}')
  return path


def _read_only_fs(path: str) -> bool:
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


# ---------------------------------------------------------------------------
# absl commands (vit_jax.main)
# ---------------------------------------------------------------------------

def _fail(message: str) -> NoReturn:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_STATUS)


def _config_loading_error(text: str) -> str:
  """The last line of a traceback that ml_collections folded into a flag error."""
  rows = [row.strip() for row in text.splitlines() if row.strip()]
  last = rows[-1] if rows else text
  for prefix in ('ValueError: ', 'TypeError: ', 'KeyError: ', 'AttributeError: ',
                 'FileNotFoundError: ', 'ImportError: ', 'ModuleNotFoundError: '):
    if last.startswith(prefix):
      return last[len(prefix):]
  return last


def _unknown_override(argv: Sequence[str], error: BaseException) -> str:
  """'--config.foo=1: config has no field foo' from ml_collections' KeyError/AttributeError."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  name = str(error).strip('\'"')
  overrides = [a for a in argv[1:] if a.startswith('--') and '.' in a.split('=', 1)[0]]
  culprit = next((a for a in overrides if name and name in a.split('=', 1)[0].split('.')),
                 overrides[0] if overrides else None)
  if culprit is None:
    return f'unknown config field {name!r}'
  flag, path = culprit[2:].split('=', 1)[0].split('.', 1)
  config = None
  try:
    config = flags.FLAGS[flag].value
  except (KeyError, AttributeError):
    pass
  if not hasattr(config, 'keys'):  # the parse stopped before the config was set
    from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
    config = schema.base_config()
  parent = config
  parts = path.split('.')
  for part in parts[:-1]:
    parent = parent.get(part) if hasattr(parent, 'get') else None
  known = sorted(parent.keys()) if hasattr(parent, 'keys') else []
  close = difflib.get_close_matches(parts[-1], known, n=3)
  hint = (f'; did you mean {", ".join(close)}?' if close else
          f'; known fields: {", ".join(known)}' if known else '')
  return f'{culprit}: the config has no field {path!r}{hint}'


def refuse_positional(args: Sequence[str]) -> NoReturn:
  """An absl command takes flags only: a stray word is one `error:` line, exit status 2."""
  _fail(f'unexpected argument(s) {" ".join(args)!r}: this command takes flags only '
        '(--name=value; see --help)')


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
  """absl flag parsing with one-line errors: pass as `app.run(main, flags_parser=...)`.

  A malformed or unknown flag, an unknown `--config.FIELD`, a config file that
  does not exist or whose `get_config` raises: `error: ...` and exit status 2.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  argv = list(argv)
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    missing = re.findall(r'Flag --(\w+) must have a value other than None', text)
    if missing:
      _fail(f'{" and ".join("--" + name for name in missing)} '
            f'{"is" if len(missing) == 1 else "are"} required (see --help)')
    first = text.splitlines()[0] if text else type(e).__name__
    if 'Traceback' in text or len(text.splitlines()) > 1:
      flag = first.split(': ', 1)[0].replace('flag ', '', 1)
      _fail(f'{flag}: {_config_loading_error(text)}')
    _fail(first)
  except (KeyError, AttributeError) as e:
    _fail(_unknown_override(argv, e))
  except (ValueError, TypeError, OSError) as e:
    _fail(user_error_message(e))
  if len(remaining) > 1:
    refuse_positional(remaining[1:])
  for name in list(flags.FLAGS):
    value = flags.FLAGS[name].value
    if type(value).__name__ == '_ErrorConfig':  # ml_collections' deferred load failure
      cause = value.__dict__.get('_error')
      given = next((a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')),
                   next((b for a, b in zip(argv, argv[1:]) if a == f'--{name}'), ''))
      path = given.split(':', 1)[0]
      if path and not os.path.exists(path):
        _fail(f'--{name}={given}: no such config file {path!r}')
      _fail(f'--{name}={given}: '
            f'{user_error_message(cause) if cause else "cannot load the config file"}')
  return remaining


# ---------------------------------------------------------------------------
# Console
# ---------------------------------------------------------------------------

class _OwnInfoOnly(logging.Filter):
  """INFO records of vit_jax (and of `__main__` scripts); other libraries' warnings."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return (f'{os.sep}vit_jax{os.sep}' in record.pathname
            or f'{os.sep}benchmarks{os.sep}' in record.pathname)


def _cpu_only_machine() -> bool:
  """No TPU and no GPU device on this machine, while an accelerator plugin is installed.

  Then CPU is the only backend JAX can start, and probing the others only prints
  their failures (libtpu's "Failed to find host bounds ...", "Unable to initialize
  backend 'tpu'", the CUDA plugin's initialisation traceback). TPUs are found as
  JAX's own check finds them (Google's PCI vendor id, /dev/accel*, /dev/vfio);
  GPUs by their device files (/dev/nvidia*, /dev/kfd, /dev/dxg).
  """
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  plugins = ('libtpu', 'jax_plugins', 'jax_cuda12_plugin', 'jax_cuda13_plugin',
             'jax_rocm60_plugin', 'jax_rocm7_plugin')
  if not any(importlib.util.find_spec(name) is not None for name in plugins):
    return False  # JAX starts its CPU backend alone anyway
  for pattern in ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd',
                  '/dev/dxg', '/proc/driver/nvidia'):
    if glob.glob(pattern):
      return False
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor, encoding='ascii') as f:
        if f.read().strip() == '0x1ae0':  # Google (TPU)
          return False
    except OSError:
      pass
  return True


def quiet_console() -> None:
  """Keeps library banners off the console; call before TensorFlow and JAX load.

  TensorFlow's C++ log is off the console (TF_CPP_MIN_LOG_LEVEL=3): its INFO lines
  (the oneDNN banner, the CPU-instructions note), and the warnings and errors of ops
  that failed (a bad training image: libjpeg's complaint, each EagerPyFunc's Python
  traceback), which reach Python as exceptions that the commands report in one line.
  On a machine without TPUs or GPUs but with
  libtpu or a CUDA plugin installed, JAX_PLATFORMS=cpu skips their probes and failure
  lines; TFDS's, Orbax's and JAX's INFO records are filtered out of absl's
  console handler. Settings the user made in the environment win.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')
  if 'JAX_PLATFORMS' not in os.environ and _cpu_only_machine():
    os.environ['JAX_PLATFORMS'] = 'cpu'  # the only backend there is: no TPU/GPU probes
    jax = sys.modules.get('jax')
    if jax is not None:  # imported by the command's module: its flag read the environment
      jax.config.update('jax_platforms', 'cpu')  # backends start on first use, not yet
  for name in ('jax._src.xla_bridge', 'tensorflow_datasets', 'orbax'):
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
    handler.addFilter(_OwnInfoOnly())
