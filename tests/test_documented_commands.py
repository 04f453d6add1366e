"""Every shell command in README.md and docs/*.md runs here, at a tiny size.

Commands come from fenced blocks tagged sh, bash, shell or console (in console
blocks only the `$ ` lines): backslash continuations are joined, `# comments`
dropped and `a && b` split into two commands. A block found both in README.md
and in a docs page is one block, named after its docs file and line. A command runs unless the EXEMPT table below
names it with the reason and where else it is covered;
`test_every_command_runs_or_is_exempt` fails for a newly documented command
that neither runs nor is exempt, and for an exemption that matches no command.

What runs differs from the documented text in exactly these ways:

1. Environment: `python` is this interpreter, the working directory is the
   repository root, and the XLA_FLAGS of tests/conftest.py (8 fake devices) is
   removed, so each command sees one CPU device as on a plain machine.
2. Appended options, per program (TINY below): absl flags and argparse options
   both keep the last occurrence, so the documented values are still parsed and
   then replaced; a tuple-typed config field (`--config.image_size`) would
   accumulate instead, so its documented value is dropped. `vit_jax.main`: 2 steps of ViT-Test_4 at 16x16, batch 16, on
   the embedded digits in a module-wide data dir. `vit_jax.compare`: the same
   sizes, one seed, and `--only ViT` (the ResNet side of the CLI is trained by
   tests/test_compare.py::test_cli_tiny_run). `benchmarks/benchmark.py`: one
   cell, ViT-Test_4@16, batch 2, fp32, one repeat of one step, inference only,
   no timm contender and no scaling table, the smoke preset with no minimum
   repeat time (so the documented presets, checked by argparse, then run one
   cell alike and are run once; the training and timm paths run in
   tests/test_benchmark_smoke.py, which runs `--preset smoke` as documented).
   `benchmarks/attention_benchmark.py`: 1 x 17 tokens x 2 heads x 8, one round.
   `benchmarks/max_batch.py`: ViT-Test_4 at 16x16, ours only, a 4 GiB budget and
   batches up to 16 (so it must report 16). `bash benchmarks/gpu_check.sh
   --dry-run`: nothing appended (it prints the command; the real run needs a GPU).
   `benchmarks/remat_policies.py`: ViT-Test_4 at 16x16, batch 2, one round of one step.
   `benchmarks/small_data_study.py`: ViT-Test_4, one seed of 2 steps of 16 for the arm
   medium2.
   `vit_jax.evaluate`: `--model ViT-Test_4`, 16x16, batch 16, the module's data dir.
   `vit_jax.visualize`, `vit_jax.convert`, `vit_jax.predict`: nothing appended.
   `vit_jax.export`: `--image_size 16`. `vit_jax.onnx_classify`: nothing appended.
3. Substitutions:
   - `--config configs/NAME.py[:ARG]` (main, visualize) -> `configs/NAME.py:ARG,runlocal`
     for the paper's recipes (vit_jax/configs/recipes.py `from_arg`), else
     `configs/NAME.py:ViT-Test_4`;
   - `--model NAME` (visualize, convert, predict, export) -> `ViT-Test_4`;
   - a path `/tmp/NAME...` -> NAME under a fresh directory per docs block, and a
     relative output (`--out`, `--output`, `--json`, and main's `--workdir`)
     -> the same directory; a later input naming it reads it there;
   - an input `/tmp/NAME` that no earlier command of its block writes: the
     first documented command (README order) that writes it runs first, once,
     and the input is read from its block's directory (the visualize examples
     read the digits run of docs/training.md this way); `/tmp/before`, written
     by the exempt `git worktree add`, is a link to this tree;
   - `/data/tfds` -> the module's digits data dir; any other input `*.npz`
     (`/data/vit/ViT-L_16.npz`, `ViT-B_16.npz`, `/path/to/*.npz`, ...) -> a
     ViT-Test_4 checkpoint with 1000 classes at 16x16 in the published layout
     (`vit_jax.checkpoint.save`); `*.pth` -> its timm state dict
     (`vit_jax.convert.to_timm`); `*.jpg` / `*.png` -> a 64x48 JPEG.
4. Scheduling: the commands of one block run in order within one test; a
   benchmark.py or vit_jax.compare command whose options (the last occurrence of
   each, as argparse reads them) are the same as an earlier one's after these
   changes reuses that run's output and a copy of its --json file or --out
   directory instead of running again; blocks
   run two at a time in background threads (VIT_DOC_COMMANDS_JOBS=N to change).

Each command must exit 0 (or, if listed in EXPECTED_FAILURES, fail with its
documented message), print only its own lines when it is one of the package's
(`vit_jax.*`, run without tests/conftest.py's JAX_PLATFORMS and
TF_CPP_MIN_LOG_LEVEL, as from a user's shell with the [test] extra's libtpu and
CUDA plugin installed: `foreign_lines`), and leave real output: final_metrics.json in a workdir,
the PNGs in visualize's --out, compare's table and plot, a benchmark table and
JSON, converted files that load, five predictions.

Commands that need a cluster (several hosts, TPUs or GPUs) are the ones started
by a launcher in CLUSTER_LAUNCHERS (gcloud's TPU VM ssh, srun) and the
`vit_jax.main` commands that join other processes (CLUSTER_FLAGS, e.g.
`--coordinator_address`). They do not run, but their `python -m vit_jax.main ...`
(in the launcher's arguments, or in the shell line it passes on, such as gcloud's
`--command="cd vit_jax && python -m vit_jax.main ..."`) runs unchanged with
`--dry_run` appended, in the environment the launcher would give it
(CLUSTER_LAUNCHERS): the flags, the config with its overrides and the mesh must
resolve, and the run must join the other processes.

Two further runs: the documented `--config.model.transformer.dropout_rate=0.1`
override on configs/default.py, and a fine-tuning command whose data dir holds
no dataset, which must stop with the "not prepared" message naming that dir.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL_TAGS = ('sh', 'bash', 'shell', 'console')
TINY_MODEL = 'ViT-Test_4'
TOTAL_STEPS = 2
COMMAND_TIMEOUT_S = 600

# Documented commands that do not run here: command -> (why, where it is covered).
EXEMPT = {
    # The AugReg release's folder is not made here: tests/test_augreg_docs.py runs these
    # on a release folder (index.csv and .npz files) it writes.
    'python -m vit_jax.augreg --index /data/augreg/index.csv --model R26_S_32 --ds i21k '
    '--adapt_ds imagenet2012 --top 5':
        ('reads a local copy of the AugReg index', 'tests/test_augreg_docs.py runs it on a '
         'test-made index.csv'),
    'python -m vit_jax.main --config=configs/augreg.py:R26_S_32 '
    '--config.pretrained_dir=/data/augreg --config.data_dir=/data/tfds '
    '--workdir=/tmp/r26_s32':
        ('fine-tunes a checkpoint of a local copy of the AugReg release',
         'tests/test_augreg_index.py::test_finetunes_on_digits runs it on the digits, 2 steps '
         'at 64 px, from a test-made release folder'),
    'python -m vit_jax.predict --checkpoint /data/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-'
    'wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz --image /data/cat.jpg':
        ('reads a release-named checkpoint', 'tests/test_augreg_docs.py runs it on a '
         'test-made file of that name'),
    'pip install -c constraints.txt -e .':
        ('installs the package into the environment', '.ci/run installs it the same way, '
         'with the [test] extra, into a fresh virtual environment'),
    "pip install -c constraints.txt -e '.[test]'":
        ('installs the package into the environment', '.ci/run runs exactly this'),
    'python benchmarks/plan_recipes.py --run all':
        ('compiles every recipe for every target: hours on a small CPU',
         'tests/test_plan.py compiles the same step for a TPU topology and GPU nodes, and '
         'the documented vit_jax.plan commands run here at the runlocal size'),
    "pip install -c constraints.txt -e '.[plan]'":
        ('installs the compile-only TPU and GPU compilers',
         '.ci/run installs them with the [test] extra; tests/test_plan.py uses them'),
    "pip install -c constraints.txt -e '.[export]'":
        ('installs the package into the environment',
         "'.[test]' (what .ci/run installs) holds every package of '.[export]'"),
    'python -m pytest -q':
        ('the whole test suite, this module included', '.ci/run runs exactly this'),
    "python -m pytest -q -m 'not slow'":
        ('the fast tier of the suite, this module included',
         '.ci/run runs the whole suite, which holds every test of the fast tier'),
    'python -m vit_jax.main --config=... --workdir=/shared/run --coordinator_address=host0:1234 '
    '--num_processes=2 --process_id=0':
        ('needs a second host (host0:1234) and names no config',
         'tests/test_train_multiprocess.py runs two processes with --coordinator_address, '
         '--num_processes and --process_id on localhost'),
    "git worktree add /tmp/before 'HEAD~1'":
        ('set-up that adds a worktree to the shared git repository',
         'the benchmark commands that read /tmp/before get a link to this tree there'),
    'bash benchmarks/gpu_check.sh':
        ('needs a GPU (cuDNN attention, ViT-B/16 at batch 256)',
         'its --dry-run is run here and in tests/test_benchmark_smoke.py'),
    'python benchmarks/benchmark.py --models ViT-B_16 --batch-size 256 --dtypes bf16 '
    '--attention cudnn --train-step project --json h100.json':
        ('needs a GPU (cuDNN attention)',
         'the other benchmark commands here run the same CLI on the CPU'),
}

# Documented commands that need a cluster, by the launcher they start with:
# launcher -> (why, the environment variables it gives the command it starts).
CLUSTER_LAUNCHERS = {
    'gcloud compute tpus tpu-vm ssh':
        ('runs its --command on every host of a Cloud TPU VM slice', {}),
    'gcloud compute tpus queued-resources ssh':
        ('runs its --command on every host of every slice of a queued resource', {}),
    'srun': ('starts one task per GPU on the nodes of a SLURM job',
             {'SLURM_NTASKS': '32', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}),
}
# A `vit_jax.main` command with one of these joins other processes: it needs a cluster too.
CLUSTER_FLAGS = ('--coordinator_address', '--num_processes', '--process_id', '--multiprocess')

# Documented commands that are meant to fail: command -> text their output must contain.
EXPECTED_FAILURES: dict[str, str] = {}

# Appended per program; '{tfds}' is the module's digits data dir.
TINY = {
    'vit_jax.main': [
        f'--config.total_steps={TOTAL_STEPS}', '--config.warmup_steps=1',
        '--config.batch_size=16', '--config.eval_batch_size=16',
        '--config.grad_accum_steps=1', '--config.eval_every=0', '--config.checkpoint_every=0',
        '--config.log_every=1', f'--config.model_name={TINY_MODEL}', '--config.image_size=16',
        '--config.dataset=digits', '--config.data_dir={tfds}'],
    'vit_jax.visualize': [],
    'vit_jax.compare': [
        '--steps', str(TOTAL_STEPS), '--batch-size', '16', '--eval-batch-size', '16',
        '--eval-points', '1', '--image-size', '16', '--dataset', 'digits',
        '--data-dir', '{tfds}', '--vit-model', TINY_MODEL, '--only', 'ViT', '--seeds', '1'],
    'vit_jax.convert': [],
    'vit_jax.predict': [],
    'vit_jax.export': ['--image_size', '16'],
    # The documented target, the recipe's runlocal model (ViT-Test_4 at 16 px): a
    # batch every target's chip count divides; no search (tests/test_plan.py runs it).
    'vit_jax.plan': ['--config.batch_size=256', '--config.eval_batch_size=256', '--nosearch'],
    'vit_jax.onnx_classify': [],
    'vit_jax.evaluate': ['--model', TINY_MODEL, '--image_size', '16', '--batch_size', '16',
                         '--data_dir', '{tfds}'],
    'benchmarks/benchmark.py': [
        '--models', f'{TINY_MODEL}@16', '--batch-size', '2', '--dtypes', 'fp32',
        '--repeats', '1', '--steps', '1', '--modes', 'infer', '--no-timm', '--no-scaling',
        '--preset', 'smoke', '--min-repeat-seconds', '0'],
    'benchmarks/attention_benchmark.py': [
        '--batch', '1', '--tokens', '17', '--heads', '2', '--head-dim', '8', '--rounds', '1'],
    'benchmarks/max_batch.py': [
        '--models', TINY_MODEL, '--image-size', '16', '--memory-gb', '4', '--max-batch', '16',
        '--frameworks', 'jax'],
    'benchmarks/gpu_check.sh': [],
    'benchmarks/plan_recipes.py': [],  # --table only reads docs/results/plans
    'benchmarks/remat_policies.py': [
        '--model', TINY_MODEL, '--image-size', '16', '--batch-size', '2', '--rounds', '1',
        '--steps', '1'],
    'benchmarks/input_pipeline_benchmark.py': [
        '--num_images', '16', '--jpeg_size', '64', '48', '--image_size', '32',
        '--batch_size', '8', '--num_batches', '1', '--warmup', '1', '--repeats', '1'],
    # RandAugment + mixup, one seed of 2 steps (stochastic depth: the AugReg command).
    'benchmarks/small_data_study.py': [
        '--model', TINY_MODEL, '--steps', str(TOTAL_STEPS), '--batch-size', '16', '--seeds', '1',
        '--arms', 'medium2', '--data-dir', '{tfds}'],
}
# Tuple-typed config fields: ml_collections appends a repeated override to the tuple,
# so the documented value is dropped and TINY's used instead (rule 2).
REPLACED_FLAGS = ('--config.image_size',)
# Programs whose `--model` / `--config` values are replaced (rule 3).
MODEL_FLAG_PROGRAMS = ('vit_jax.visualize', 'vit_jax.convert', 'vit_jax.predict',
                       'vit_jax.export')
CONFIG_FLAG_PROGRAMS = ('vit_jax.main', 'vit_jax.visualize', 'vit_jax.plan')
OUTPUT_FLAGS = ('--out', '--output', '--json')
TMP_PATH = re.compile(r'/tmp/([^/\s;,"\']+)')
VISUALIZE_FILES = ('patches.png', 'position_embedding_similarity.png', 'attention_maps.png',
                   'attention_rollout.png', 'attention_distance.png', 'top5.png',
                   'analysis.json')


# ---------------------------------------------------------------------------
# Extraction.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
  id: str  # 'training.md:15': docs file and line of the opening fence
  text: str
  commands: list  # shlex-joined command strings


def _fenced_blocks(path: str):
  """(line of the opening fence, tag, body) of every fenced block of a markdown file."""
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  i = 0
  while i < len(lines):
    opening = re.match(r'^(\s*)(```+|~~~+)\s*([\w+-]*)', lines[i])
    if not opening:
      i += 1
      continue
    fence, tag, start = opening.group(2), opening.group(3).lower(), i
    body = []
    i += 1
    while i < len(lines) and not lines[i].strip().startswith(fence):
      body.append(lines[i])
      i += 1
    yield start + 1, tag, '\n'.join(body)
    i += 1


def split_commands(text: str, tag: str = 'sh') -> list[str]:
  """Commands of a shell block, each as shlex.join of its words."""
  text = re.sub(r'\\\n', ' ', text)
  commands = []
  for line in text.splitlines():
    if tag == 'console':
      if not line.lstrip().startswith('$ '):
        continue
      line = line.lstrip()[2:]
    words = shlex.split(line, comments=True)
    current: list[str] = []
    for word in words + ['&&']:
      if word == '&&':
        if current:
          commands.append(shlex.join(current))
        current = []
      else:
        current.append(word)
  return commands


def documented_blocks() -> list[Block]:
  """Shell blocks of README.md in its order (named by their docs source), then any others."""
  docs = {}
  for path in sorted(glob.glob(os.path.join(REPO, 'docs', '*.md'))):
    for line, tag, body in _fenced_blocks(path):
      if tag in SHELL_TAGS:
        docs.setdefault((tag, body), f'{os.path.basename(path)}:{line}')
  blocks, seen = [], set()
  readme = [(f'README.md:{line}', tag, body)
            for line, tag, body in _fenced_blocks(os.path.join(REPO, 'README.md'))
            if tag in SHELL_TAGS]
  others = [(name, tag, body) for (tag, body), name in docs.items()]
  for name, tag, body in readme + others:
    if (tag, body) in seen:
      continue
    seen.add((tag, body))
    blocks.append(Block(docs.get((tag, body), name), body, split_commands(body, tag)))
  return blocks


BLOCKS = documented_blocks()
BLOCKS_BY_ID = {b.id: b for b in BLOCKS}


def program(words: list[str]) -> tuple[str, list[str]]:
  """('vit_jax.main', args) for `python -m vit_jax.main ...`; (script, args) for scripts."""
  if words[0] in ('python', 'python3') and len(words) > 2 and words[1] == '-m':
    return words[2], words[3:]
  if words[0] in ('python', 'python3', 'bash') and len(words) > 1:
    return words[1], words[2:]
  return words[0], words[1:]


def options(args: list[str]) -> list[list]:
  """[[flag, value, form]]: form '=' (`--f=v`), ' ' (`--f v`), None (bare flag or positional)."""
  out, i = [], 0
  while i < len(args):
    word = args[i]
    if word.startswith('--') and '=' in word:
      flag, value = word.split('=', 1)
      out.append([flag, value, '='])
    elif word.startswith('-') and i + 1 < len(args) and not args[i + 1].startswith('-'):
      out.append([word, args[i + 1], ' '])
      i += 1
    elif word.startswith('-'):
      out.append([word, None, None])
    else:
      out.append([None, word, None])
    i += 1
  return out


def unparse(opts: list[list]) -> list[str]:
  words = []
  for flag, value, form in opts:
    if form == '=':
      words.append(f'{flag}={value}')
    elif form == ' ':
      words += [flag, value]
    else:
      words.append(flag if flag is not None else value)
  return words


def last_value(words: list[str], flag: str) -> Optional[str]:
  values = [v for f, v, _ in options(words) if f == flag]
  return values[-1] if values else None


def writes(command: str) -> set[str]:
  """The /tmp/NAME directories a command writes (its outputs and main's workdir)."""
  prog, args = program(shlex.split(command))
  flags = OUTPUT_FLAGS + (('--workdir',) if prog == 'vit_jax.main' else ())
  names = set()
  for flag, value, _ in options(args):
    if flag in flags and value:
      names.update(TMP_PATH.findall(value))
  return names


def producer(name: str, reader: Block) -> Optional[Block]:
  """The block of the first documented command (README order) that writes /tmp/NAME.

  Only blocks before `reader` count, so blocks wait on earlier blocks only (no cycles).
  """
  for block in BLOCKS:
    if block.id == reader.id:
      return None
    for command in block.commands:
      if command not in EXEMPT and not cluster(command) and name in writes(command):
        return block
  return None


def runnable(command: str) -> bool:
  return program(shlex.split(command))[0] in TINY


def cluster(command: str) -> Optional[str]:
  """The launcher of a command that needs a cluster ('' for a vit_jax.main that joins
  other processes by its flags); None for the others."""
  for launcher in CLUSTER_LAUNCHERS:
    if command == launcher or command.startswith(launcher + ' '):
      return launcher
  prog, args = program(shlex.split(command))
  if prog == 'vit_jax.main' and any(flag in CLUSTER_FLAGS for flag, _, _ in options(args)):
    return ''
  return None


def cluster_main_argv(command: str) -> Optional[list[str]]:
  """The `python -m vit_jax.main ...` words that a cluster command runs: among its
  own words, or in a shell line passed in one of them (`--command=cd x && python ...`)."""
  words = shlex.split(command)
  for i, word in enumerate(words):
    if word in ('python', 'python3') and words[i + 1:i + 3] == ['-m', 'vit_jax.main']:
      return words[i:]
    value = word.partition('=')[2]
    if 'vit_jax.main' in value:
      for inner in split_commands(value):
        found = cluster_main_argv(inner)
        if found:
          return found
  return None


# ---------------------------------------------------------------------------
# Fixtures: data dir, tiny checkpoint, torch file, photo, stand-in checkout.
# ---------------------------------------------------------------------------

# Most documented commands run the same tiny model: one persistent compilation cache
# for all their processes compiles each of its steps once.
COMPILATION_CACHE = tempfile.mkdtemp(prefix='vit_jax_doc_commands_jax_cache_')
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)


def subprocess_env(prog: str = '') -> dict:
  """The commands' environment. The package's own commands (`vit_jax.*`) get what a user's
  shell has: tests/conftest.py's quieting (JAX_PLATFORMS=cpu, TF_CPP_MIN_LOG_LEVEL, ...)
  is removed, so that `foreign_lines` checks what the commands themselves keep quiet."""
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  if prog.startswith('vit_jax.'):
    for name in ('TF_CPP_MIN_LOG_LEVEL', 'JAX_PLATFORMS', 'ALLOW_MULTIPLE_LIBTPU_LOAD'):
      env.pop(name, None)
  env.update(JAX_COMPILATION_CACHE_DIR=COMPILATION_CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


@dataclasses.dataclass
class Fixtures:
  root: str
  tfds: str
  npz: str
  pth: str
  photo: str
  stand_ins: dict


def build_fixtures(root: str) -> Fixtures:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from vit_jax import checkpoint, convert  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top

  fixtures = os.path.join(root, 'fixtures')
  os.makedirs(fixtures)
  tfds_dir = os.path.join(root, 'tfds')
  # Prepared once here, so commands running at the same time only read it.
  prepare = subprocess.Popen(
      [sys.executable, '-c', 'import sys; from vit_jax import datasets; '
       'datasets.get_builder("digits", data_dir=sys.argv[1]).download_and_prepare()', tfds_dir],
      cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  model = models.build_model(TINY_MODEL, num_classes=1000)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  params = jax.tree_util.tree_map(np.asarray, params)
  npz = os.path.join(fixtures, f'{TINY_MODEL}.npz')
  checkpoint.save(params, npz)
  pth = os.path.join(fixtures, 'vit.pth')
  convert.write_torch_file(
      convert.to_timm(params, convert.uses_tanh_gelu(models.get_config(TINY_MODEL))), pth)
  photo = os.path.join(fixtures, 'photo.jpg')
  pixels = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
  Image.fromarray(pixels).save(photo)
  # A link, not a copy: the benchmark's workers read benchmarks/ from this tree,
  # so its vit_jax must be this tree's too (a copy drifts when files change mid-run).
  before = os.path.join(fixtures, 'before')
  os.symlink(REPO, before)

  output, _ = prepare.communicate(timeout=COMMAND_TIMEOUT_S)
  assert prepare.returncode == 0, output[-4000:]
  return Fixtures(root, tfds_dir, npz, pth, photo, {'before': before})


# ---------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  command: str  # as documented
  argv: list  # as run
  returncode: int
  output: str  # stdout + stderr
  stdout: str
  seconds: float

  def tail(self, n: int = 6000) -> str:
    return (f'documented: {self.command}\nran ({self.seconds:.0f} s, exit status '
            f'{self.returncode}): {shlex.join(self.argv)}\n...\n{self.output[-n:]}')


class Runner:
  """Runs jobs (a block's commands, or a single check) once each, some in the background."""

  def __init__(self, fixtures: Fixtures, jobs: int):
    self.fx = fixtures
    self._lock = threading.Lock()
    self._job_locks: dict[str, threading.Lock] = {}
    self._results: dict[str, object] = {}
    self._slots = threading.BoundedSemaphore(jobs)
    self._pool = concurrent.futures.ThreadPoolExecutor(jobs)

  def get(self, key: str, job: Callable[['Runner'], object]):
    with self._lock:
      lock = self._job_locks.setdefault(key, threading.Lock())
    with lock:
      if key not in self._results:
        try:
          self._results[key] = job(self)
        except BaseException as e:  # pylint: disable=broad-except
          self._results[key] = e
    result = self._results[key]
    if isinstance(result, BaseException):
      raise result
    return result

  def prefetch(self, tasks: list):
    """Starts zero-argument callables in the background; their errors reach the tests."""
    for task in tasks:
      self._pool.submit(self._quiet, task)

  @staticmethod
  def _quiet(task):
    try:
      task()
    except BaseException:  # pylint: disable=broad-except
      pass  # cached by `get`, raised again in the test that asks for it

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)

  def run(self, command: str, argv: list[str], log_path: str) -> Run:
    argv = [sys.executable if argv[0] in ('python', 'python3') else argv[0]] + argv[1:]
    key, out_flag, out_path = _dedupe_key(argv)
    if key is not None:
      # benchmark.py and compare commands that are the same after the tiny changes
      # run once; the others get that run's output and a copy of what it wrote.
      first = self.get(f'dedupe:{key}', lambda runner: runner._run(command, argv, log_path))
      first_out = last_value(first.argv, out_flag)
      if out_path and first_out and first.argv != argv and os.path.exists(first_out):
        if os.path.isdir(first_out):
          shutil.copytree(first_out, out_path, dirs_exist_ok=True)
        else:
          shutil.copyfile(first_out, out_path)
      return Run(command, argv, first.returncode, first.output, first.stdout, first.seconds)
    return self._run(command, argv, log_path)

  def _run(self, command: str, argv: list[str], log_path: str) -> Run:
    with self._slots:
      start = time.monotonic()
      proc = subprocess.run(argv, cwd=REPO, env=subprocess_env(program(
                                ['python'] + argv[1:])[0]), capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT_S)
      seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    with open(log_path, 'w', encoding='utf-8') as f:
      f.write(f'$ {shlex.join(argv)}\n# exit status {proc.returncode} after {seconds:.1f} s\n'
              f'{output}')
    return Run(command, argv, proc.returncode, output, proc.stdout, seconds)


# Programs whose runs are deduplicated (rule 4) and the option naming what they write.
DEDUPED = {'benchmarks/benchmark.py': '--json', 'vit_jax.compare': '--out'}


def _dedupe_key(argv: list[str]) -> tuple:
  """(key, output flag, output path) of a run DEDUPED covers, else (None, None, None).

  The key is the program and its options with the last occurrence of each
  winning (as argparse reads them), the output option left out.
  """
  words = ['python'] + argv[1:]
  prog, args = program(words)
  out_flag = DEDUPED.get(prog)
  if out_flag is None:
    return None, None, None
  effective = {}
  for flag, value, _ in options(args):
    effective[flag] = value
  out_path = effective.pop(out_flag, None)
  return (prog, tuple(sorted((str(k), str(v)) for k, v in effective.items())),
          out_path is not None), out_flag, out_path


def block_dir(fx: Fixtures, block: Block) -> str:
  return os.path.join(fx.root, re.sub(r'[^\w.-]', '-', block.id))


class BlockContext:
  """Where a block's paths go: its own directory, inputs from fixtures or other blocks."""

  def __init__(self, runner: Runner, block: Block):
    self.runner = runner
    self.fx = runner.fx
    self.block = block
    self.dir = block_dir(self.fx, block)
    os.makedirs(self.dir, exist_ok=True)
    self.tmp: dict[str, str] = {}  # /tmp/NAME -> directory
    self.relative: dict[str, str] = {}  # relative output as written -> path

  def _tmp(self, value: str, write: bool) -> str:
    def replace(match):
      name = match.group(1)
      if write:
        self.tmp.setdefault(name, os.path.join(self.dir, name))
      if name not in self.tmp:
        if name in self.fx.stand_ins:
          self.tmp[name] = self.fx.stand_ins[name]
        else:
          block = producer(name, self.block)
          assert block is not None, (
              f'{self.block.id} reads /tmp/{name}, which no command documented before it writes')
          run_block(self.runner, block)
          self.tmp[name] = os.path.join(block_dir(self.fx, block), name)
      return self.tmp[name]
    return TMP_PATH.sub(replace, value)

  def value(self, prog: str, flag: Optional[str], value: str) -> str:
    write = flag in OUTPUT_FLAGS or (prog == 'vit_jax.main' and flag == '--workdir')
    if flag == '--model' and prog in MODEL_FLAG_PROGRAMS:
      return TINY_MODEL
    if flag == '--config' and prog in CONFIG_FLAG_PROGRAMS and value.startswith('configs/'):
      path, _, arg = value.partition(':')
      with open(os.path.join(REPO, path)) as f:
        recipe = 'recipes.from_arg' in f.read()
      # A paper recipe keeps its model and gets its runlocal variant (tiny model,
      # digits); the digits configs take the tiny model as their argument.
      return f'{path}:{arg},runlocal'.replace(':,', ':') if recipe else f'{path}:{TINY_MODEL}'
    if TMP_PATH.search(value):
      return self._tmp(value, write)
    if write and not os.path.isabs(value):
      self.relative[value.rstrip('/')] = os.path.join(self.dir, value)
      return self.relative[value.rstrip('/')]
    if value.rstrip('/') in self.relative:
      return self.relative[value.rstrip('/')]
    if flag is None:
      return value
    if value == '/data/tfds' or value.startswith('/data/tfds/'):
      return self.fx.tfds + value[len('/data/tfds'):]
    if value.endswith('.npz'):
      return self.fx.npz
    if value.endswith('.pth'):
      return self.fx.pth
    if value.lower().endswith(('.jpg', '.jpeg', '.png')):
      return self.fx.photo
    return value

  def argv(self, command: str, tiny: bool = True) -> list[str]:
    words = shlex.split(command)
    prog, args = program(words)
    opts = options(args)
    for opt in opts:
      if opt[1] is not None:
        opt[1] = self.value(prog, opt[0], opt[1])
    head = words[:len(words) - len(args)]
    extra = [w.format(tfds=self.fx.tfds) for w in TINY[prog]] if tiny else []
    if tiny:  # tuple-typed config flags accumulate when repeated: replace, not append
      opts = [o for o in opts if o[0] not in REPLACED_FLAGS]
    return head + unparse(opts) + extra


def run_block(runner: Runner, block: Block) -> list:
  """Runs a block's commands in order (once per module); a list of Run or exemption reasons."""
  def job(runner):
    context = BlockContext(runner, block)
    results = []
    for index, command in enumerate(block.commands):
      if command in EXEMPT:
        results.append(EXEMPT[command])
        continue
      if cluster(command) is not None:  # test_cluster_command_parses dry-runs it
        results.append(('needs a cluster', 'its --dry_run runs here'))
        continue
      log = os.path.join(context.dir, f'{index}.log')
      results.append(runner.run(command, context.argv(command), log))
    return results
  return runner.get(f'block:{block.id}', job)


# ---------------------------------------------------------------------------
# What each program must leave behind.
# ---------------------------------------------------------------------------

def _check_input_pipeline(run: Run) -> list[str]:
  found = re.search(r'with the augmentation, ([\d.]+)x the images per CPU-second', run.stdout)
  return [] if found and float(found.group(1)) > 0 else ['no augmentation ratio printed']


def _check_plan_table(run: Run) -> list[str]:
  return [] if re.search(r'^\| B16-i21k \|.*fits', run.stdout, re.M) else ['no plans table']


def _check_plan(run: Run) -> list[str]:
  path = last_value(run.argv, '--json')
  if path:
    if not os.path.isfile(path):
      return [f'{path} was not written']
    with open(path, encoding='utf-8') as f:
      plan = json.load(f)
    wanted = ('fits', 'per_chip_bytes', 'hbm_bytes', 'flops_per_step', 'mesh',
              'analytic_flops_per_step', 'step_seconds_at_mfu', 'suggested_overrides')
    missing = [k for k in wanted if k not in plan]
    return [f'{path} lacks {missing}'] if missing else []
  return [] if 'memory per chip' in run.stdout else ['no memory figures printed']


def _check_main(run: Run) -> list[str]:
  workdir = last_value(run.argv, '--workdir')
  path = os.path.join(workdir, 'final_metrics.json')
  if not os.path.exists(path):
    return [f'{path} was not written']
  with open(path, encoding='utf-8') as f:
    metrics = json.load(f)
  problems = []
  if metrics.get('step') != TOTAL_STEPS or not 0 <= metrics.get('eval_accuracy', -1) <= 1:
    problems.append(f'final metrics {metrics}')
  if '--config.export_params=True' in run.argv:
    from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
    exported = os.path.join(workdir, 'params.npz')
    if not os.path.exists(exported):
      problems.append(f'--config.export_params=True wrote no {exported}')
    elif 'head/kernel' not in checkpoint.load_flat(exported):
      problems.append(f'{exported} has no head/kernel')
  return problems


def _check_visualize(run: Run) -> list[str]:
  out = last_value(run.argv, '--out')
  missing = [f for f in VISUALIZE_FILES if not os.path.isfile(os.path.join(out, f))]
  if missing:
    return [f'{out} lacks {missing}']
  with open(os.path.join(out, 'analysis.json'), encoding='utf-8') as f:
    if not json.load(f):
      return ['analysis.json is empty']
  return []


def _check_compare(run: Run) -> list[str]:
  out = last_value(run.argv, '--out')
  missing = [f for f in ('compare.md', 'compare.json', 'accuracy_vs_compute.png')
             if not os.path.isfile(os.path.join(out, f))]
  if missing:
    return [f'{out} lacks {missing}']
  with open(os.path.join(out, 'compare.md'), encoding='utf-8') as f:
    return [] if TINY_MODEL in f.read() else [f'compare.md has no {TINY_MODEL} row']


def _check_benchmark(run: Run) -> list[str]:
  problems = [] if 'Throughput, images/s' in run.stdout else ['no throughput table']
  path = last_value(run.argv, '--json')
  if path:
    if not os.path.isfile(path):
      return problems + [f'--json {path} was not written']
    with open(path, encoding='utf-8') as f:
      rows = json.load(f)['rows']
    if [r['model'] for r in rows] != [TINY_MODEL] or rows[0]['cells']['jax_infer'][
        'images_per_s'] <= 0:
      problems.append(f'JSON rows: {rows}')
  return problems


def _check_max_batch(run: Run) -> list[str]:
  row = re.search(rf'^\| {TINY_MODEL} +\| jax +\| (\d+) ', run.stdout, re.M)
  return [] if row and int(row.group(1)) == 16 else ['no largest-batch row of 16']


def _check_gpu_check(run: Run) -> list[str]:
  wanted = ('benchmarks/benchmark.py', '--batch-size 256', '--dtypes bf16', 'attention=cudnn',
            '--timm-variants eager,compiled')
  printed = ' '.join(shlex.split(run.stdout))  # printed with `printf %q`: unquote
  missing = [w for w in wanted if w not in printed]
  return [f'the printed command lacks {missing}'] if missing else []


def _check_remat_policies(run: Run) -> list[str]:
  policies = re.findall(r'^\| 2 +\| (\w+) +\| [\d.]+ +\| [\d.]+ +\| [\d.]+ +\|$', run.stdout, re.M)
  return [] if policies == ['dots', 'none', 'block'] else [f'policy rows: {policies}']


def _check_attention(run: Run) -> list[str]:
  return [] if re.search(r'^\| explicit \|.*\d', run.stdout, re.M) else ['no timing table']


def _check_convert(run: Run) -> list[str]:
  out = last_value(run.argv, '--output')
  if last_value(run.argv, '--to') == 'npz':
    from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(out):
      return [f'{out} was not written']
    flat = checkpoint.load_flat(out)
    return [] if flat['head/kernel'].shape == (32, 1000) else [f'{out}: {sorted(flat)[:5]}...']
  if last_value(run.argv, '--to') == 'hf' and not out.endswith(('.safetensors', '.bin', '.pt')):
    missing = [f for f in ('config.json', 'model.safetensors')
               if not os.path.isfile(os.path.join(out, f))]
    return [f'{out} lacks {missing}'] if missing else []
  return [] if os.path.isfile(out) else [f'{out} was not written']


def _check_predict(run: Run) -> list[str]:
  k = int(last_value(run.argv, '--top_k') or 5)
  lines = re.findall(r'^\s*\d+\.\s+[\d.]+%\s+\[\s*\d+\]', run.stdout, re.M)
  return [] if len(lines) == k else [f'expected {k} prediction lines, got {len(lines)}']


def _check_export(run: Run) -> list[str]:
  out = last_value(run.argv, '--out')
  meta_path = out + '.json'  # NAME.onnx.json: named after the whole file name
  if not os.path.isfile(out) or not os.path.isfile(meta_path):
    return [f'{out} or {meta_path} was not written']
  with open(meta_path, encoding='utf-8') as f:
    diffs = json.load(f)['check']['max_abs_logit_diff']
  return [] if set(diffs) == {'1', '5'} and max(diffs.values()) <= 1e-4 else [f'checks {diffs}']


def _check_evaluate(run: Run) -> list[str]:
  path = os.path.join(last_value(run.argv, '--out'), 'metrics.json')
  if not os.path.isfile(path):
    return [f'{path} was not written']
  with open(path, encoding='utf-8') as f:
    metrics = json.load(f)
  shots = (last_value(run.argv, '--fewshot') or '').split(',')
  missing = [f'fewshot/{k}shot_accuracy' for k in shots if k
             and f'fewshot/{k}shot_accuracy' not in metrics]
  if 'top1_accuracy' in metrics and not os.path.isfile(
      os.path.join(os.path.dirname(path), 'confusion.png')):
    missing.append('confusion.png')
  return [f'{path} lacks {missing}'] if missing else []


def _check_small_data_study(run: Run) -> list[str]:
  path = last_value(run.argv, '--json')
  if not path or not os.path.isfile(path):
    return [f'{path} was not written']
  with open(path, encoding='utf-8') as f:
    rows = json.load(f)['rows']
  arms = last_value(run.argv, '--arms').split(',')
  ok = [r['arm'] for r in rows] == arms and all(0 <= r['mean'] <= 100 for r in rows)
  return [] if ok and '| arm |' in run.output else [f'rows {rows}']


CHECKS = {
    'vit_jax.main': _check_main,
    'vit_jax.visualize': _check_visualize,
    'vit_jax.compare': _check_compare,
    'vit_jax.convert': _check_convert,
    'vit_jax.predict': _check_predict,
    'vit_jax.export': _check_export,
    'vit_jax.plan': _check_plan,
    'vit_jax.onnx_classify': _check_predict,  # the same top-k lines
    'vit_jax.evaluate': _check_evaluate,
    'benchmarks/benchmark.py': _check_benchmark,
    'benchmarks/attention_benchmark.py': _check_attention,
    'benchmarks/max_batch.py': _check_max_batch,
    'benchmarks/gpu_check.sh': _check_gpu_check,
    'benchmarks/plan_recipes.py': _check_plan_table,
    'benchmarks/remat_policies.py': _check_remat_policies,
    'benchmarks/input_pipeline_benchmark.py': _check_input_pipeline,
    'benchmarks/small_data_study.py': _check_small_data_study,
}


# What a console may show that is not the command's own: log records (absl/glog format,
# C++ included) of files outside vit_jax/, Python tracebacks and warnings, and the
# banners of JAX's plugins and libtpu.
_LOG_RECORD = re.compile(r'^[IWEF]\d{4} [\d:.]+\s+\d+ ([^:\]\s]+):\d+\]')
# `WARNING:absl:` lines are the commands' own warnings (absl logging without its handler).
_FOREIGN = re.compile(r'^(Traceback \(most recent call last\)|WARNING:(?!absl:)|Jax plugin '
                      r'configuration error|=== Source Location Trace|\S+:\d+: \w*Warning: )')
_OWN_FILES = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'vit_jax', '**', '*.py'),
                                                     recursive=True)}


def foreign_lines(output: str) -> list[str]:
  """The lines of a command's console that are not its own (issue 31: every command, on
  success, shows only its own lines)."""
  out = []
  for line in output.splitlines():
    record = _LOG_RECORD.match(line)
    if (record and os.path.basename(record.group(1)) not in _OWN_FILES) or (
        not record and _FOREIGN.match(line)):
      out.append(line)
  return out


def problems_of(run: Run) -> list[str]:
  if run.command in EXPECTED_FAILURES:
    expected = EXPECTED_FAILURES[run.command]
    if run.returncode == 0 or expected not in run.output:
      return [f'documented to fail with {expected!r}; exit status {run.returncode}']
    return []
  if run.returncode != 0:
    return [f'exit status {run.returncode}']
  prog = program(shlex.split(run.command))[0]
  foreign = foreign_lines(run.output) if prog.startswith('vit_jax.') else []
  if foreign:
    return [f'{len(foreign)} console line(s) not its own, e.g. {foreign[:3]}']
  return CHECKS[prog](run)


# ---------------------------------------------------------------------------
# Extra runs (not documented as shell blocks).
# ---------------------------------------------------------------------------

def _dropout_run(runner: Runner) -> Run:
  context = BlockContext(runner, Block('extra-dropout', '', []))
  command = ('python -m vit_jax.main --config=configs/default.py --workdir=/tmp/dropout '
             '--config.model.transformer.dropout_rate=0.1')
  return runner.run(command, context.argv(command), os.path.join(context.dir, 'run.log'))


def _missing_dataset_run(runner: Runner) -> tuple:
  context = BlockContext(runner, Block('extra-missing-dataset', '', []))
  empty = os.path.join(context.dir, 'empty_tfds')
  os.makedirs(empty)
  command = ('python -m vit_jax.main --config=configs/finetune_cifar10.py:ViT-Ti_16 '
             f'--workdir={context.dir}/workdir --config.data_dir={empty} '
             f'--config.pretrained_path={runner.fx.npz}')
  argv = shlex.split(command)
  return empty, runner.run(command, argv, os.path.join(context.dir, 'run.log'))


EXTRA_JOBS = {'extra:dropout': _dropout_run, 'extra:missing-dataset': _missing_dataset_run}


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------

RUN_BLOCKS = [b for b in BLOCKS
              if any(c not in EXEMPT and cluster(c) is None for c in b.commands)]
CLUSTER_COMMANDS = [c for b in BLOCKS for c in b.commands
                    if c not in EXEMPT and cluster(c) is not None]


@pytest.fixture(scope='module')
def runner(request, tmp_path_factory):
  root = str(tmp_path_factory.mktemp('documented_commands'))
  jobs = int(os.environ.get('VIT_DOC_COMMANDS_JOBS', '2'))
  r = Runner(build_fixtures(root), max(1, jobs))
  # Start what the selected tests will ask for, in order.
  tasks = []
  for item in request.session.items:
    if item.module is not sys.modules[__name__]:
      continue
    params = getattr(getattr(item, 'callspec', None), 'params', {})
    if 'block_id' in params:
      tasks.append(lambda block=BLOCKS_BY_ID[params['block_id']]: run_block(r, block))
    for key, job in EXTRA_JOBS.items():
      if item.name == f'test_{key.split(":")[1].replace("-", "_")}':
        tasks.append(lambda key=key, job=job: r.get(key, job))
  r.prefetch(tasks)
  yield r
  r.close()


def test_commands_are_found():
  commands = [c for b in BLOCKS for c in b.commands]
  programs = {program(shlex.split(c))[0] for c in commands}
  assert {'vit_jax.main', 'vit_jax.visualize', 'vit_jax.compare', 'vit_jax.convert',
          'vit_jax.predict', 'benchmarks/benchmark.py'} <= programs, programs
  assert split_commands('a --x=1 \\\n    --y 2  # note\nb && c "d e"') == ['a --x=1 --y 2', 'b',
                                                                          "c 'd e'"]


def test_every_command_runs_or_is_exempt():
  commands = [c for b in BLOCKS for c in b.commands]
  uncovered = [c for c in commands
               if c not in EXEMPT and cluster(c) is None and not runnable(c)]
  assert not uncovered, (
      'documented commands that neither run here (add their program to TINY and CHECKS) '
      f'nor are exempt (add them to EXEMPT with the reason): {uncovered}')
  stale = [c for c in EXEMPT if c not in commands]
  assert not stale, f'EXEMPT entries that match no documented command: {stale}'
  stale = [c for c in EXPECTED_FAILURES if c not in commands]
  assert not stale, f'EXPECTED_FAILURES entries that match no documented command: {stale}'


@pytest.mark.parametrize('command', CLUSTER_COMMANDS)
def test_cluster_command_parses(command):
  """A command that needs a cluster: its vit_jax.main resolves with --dry_run."""
  argv = cluster_main_argv(command)
  assert argv, f'a cluster command must run `python -m vit_jax.main ...`: {command}'
  env = dict(subprocess_env(), **CLUSTER_LAUNCHERS.get(cluster(command), ('', {}))[1])
  proc = subprocess.run([sys.executable] + argv[1:] + ['--dry_run'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('dry run: ')]
  assert proc.returncode == 0 and len(lines) == 2, (
      f'{shlex.join(argv)} --dry_run: exit status {proc.returncode}\n'
      f'{proc.stdout[-3000:]}{proc.stderr[-3000:]}')
  model = last_value(argv, '--config').partition(':')[2].split(',')[0]
  assert model in lines[0] and ' mesh ' in lines[0], lines
  assert 'one process' not in lines[1], f'the run does not join the other processes: {lines}'
  assert last_value(argv, '--workdir') in lines[1], lines


def test_dry_run_resolves(tmp_path):
  """--dry_run is no rubber stamp: a mesh that cannot be laid out is refused in one
  line naming config.mesh, and nothing is written."""
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=configs/pretrain_imagenet21k.py:ViT-B_16',
       f'--workdir={workdir}', '--multiprocess', "--config.mesh=(('data', -1), ('model', 4))",
       '--dry_run'], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
      timeout=COMMAND_TIMEOUT_S)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert "config.mesh: unknown axis 'model'" in errors[0], errors
  assert not workdir.exists()


def test_no_unfenced_commands():
  """A command in an indented (unfenced) code block would escape this module."""
  found = []
  for path in [os.path.join(REPO, 'README.md')] + glob.glob(os.path.join(REPO, 'docs', '*.md')):
    with open(path, encoding='utf-8') as f:
      text = f.read()
    text = re.sub(r'^\s*```.*?^\s*```', '', text, flags=re.M | re.S)
    found += [f'{os.path.basename(path)}: {line.strip()}' for line in text.splitlines()
              if re.match(r'^( {4,}|\t)(python|pip|git) ', line)]
  assert not found, f'fence these as ```sh blocks: {found}'


@pytest.mark.slow
@pytest.mark.parametrize('block_id', [b.id for b in RUN_BLOCKS])
def test_documented_block(runner, block_id):
  block = BLOCKS_BY_ID[block_id]
  failures = []
  for result in run_block(runner, block):
    if isinstance(result, Run):
      problems = problems_of(result)
      if problems:
        failures.append(f'{"; ".join(problems)}\n{result.tail()}')
  assert not failures, '\n\n'.join(failures)


@pytest.mark.slow
def test_dropout(runner):
  """`--config.model.transformer.dropout_rate=0.1` reaches the model (tiny run)."""
  run = runner.get('extra:dropout', _dropout_run)
  assert run.returncode == 0 and not _check_main(run), run.tail()
  with open(os.path.join(last_value(run.argv, '--workdir'), 'config.json'),
            encoding='utf-8') as f:  # the resolved config the run wrote
    assert json.load(f)['model']['transformer']['dropout_rate'] == 0.1, run.tail()


@pytest.mark.slow
def test_missing_dataset(runner):
  """A fine-tuning run on an empty data dir stops before training, naming the dir."""
  empty, run = runner.get('extra:missing-dataset', _missing_dataset_run)
  assert run.returncode == 2, run.tail()  # a user error: one message, exit status 2
  message = [l for l in run.output.splitlines() if l.startswith('error:')]
  assert message and 'not prepared' in message[-1] and empty in message[-1], run.tail()
