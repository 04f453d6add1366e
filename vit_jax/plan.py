"""`python -m vit_jax.plan`: compile the train step for a pod that is not here, and read its cost.

    python -m vit_jax.plan --config=configs/pretrain_imagenet21k.py:ViT-B_16 \\
        --topology=v5e:4x4 --json plan.json
    python -m vit_jax.plan --config=configs/pretrain_jft300m.py:ViT-H_14 \\
        --gpu=h100 --gpus_per_node=8 --nodes=4 --config.mesh="(('data',-1),('fsdp',8))"

The same `--config` and `--config.*` overrides as `vit_jax.main`, plus a target:
a Cloud TPU topology (`--topology=v5p:4x4x4 [--num_slices=2]`) or GPU nodes
(`--gpu=h100|h200|a100 --gpus_per_node=8 [--nodes=N]`). The step is the one
`main` would run (`train.build_program`: same model, optimizer, mesh, shardings,
donation), lowered for JAX's compile-only devices of that target
(`vit_jax.accelerators`) and compiled by the target's own XLA compiler, on this
CPU, with no dataset (the class count comes from `recipes.NUM_CLASSES` or
`--config.num_classes`). What it prints, per chip:

- parameter, optimizer-state and XLA temporary bytes against the chip's memory,
  and whether the step fits (TPU: XLA's own verdict at compile time);
- FLOPs per step (XLA's count, beside `vit_jax.flops`' analytic count x3; their
  ratio shows the rematerialisation's recomputation);
- step time and images/s at a stated MFU (default 0.5) of the chip's bf16 peak;
- the collectives of one step by kind and bytes, read from the compiled HLO.

When the step does not fit, it searches the cheapest change that does, in this
order: a stronger remat policy, gradient accumulation, a larger fsdp axis; each
candidate is compiled, and the one that fits is printed as overrides to paste.
`--json FILE` writes everything (`fits`, `per_chip_bytes`, `hbm_bytes`,
`flops_per_step`, `analytic_flops_per_step`, `mesh`, `step_seconds_at_mfu`,
`suggested_overrides`, ...). Needs `pip install -c constraints.txt -e ".[plan]"`
(libtpu and jaxlib's CUDA plugin, compile-only).
"""

from __future__ import annotations

import os
import sys

# Compile-only devices need the process itself to stay on the CPU, and libtpu
# to share the machine with other JAX processes. Set before JAX is imported.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
# Without a GPU to autotune on, XLA:GPU's Triton GEMM tiling fails on small
# matmuls ("Couldn't find output tile sizes"): plan GPU steps with cuBLAS GEMMs.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_gpu_enable_triton_gemm=false').strip()

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import re
import time
from typing import Any, Optional

from absl import app
from absl import flags
from ml_collections import config_flags

from vit_jax import cli

FLAGS = flags.FLAGS

REMAT_ORDER = ('none', 'dots', 'block')  # least recomputation (and most memory) first
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8,
                'f8e4m3fn': 1, 'f8e5m2': 1}


@dataclasses.dataclass
class Compiled:
  """One compilation of the step for the target, or the reason it failed."""
  overrides: dict[str, Any]
  compiled: Any = None
  program: Any = None
  seconds: float = 0.0
  oom_message: Optional[str] = None  # XLA refused it: more memory than the chip has
  required_bytes: Optional[float] = None  # from XLA's refusal, when it says


# ---------------------------------------------------------------------------
# Reading a compiled step.
# ---------------------------------------------------------------------------


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in re.findall(r'\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]', text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """{kind: {'count': n, 'bytes': b}} of one execution of the compiled module.

  Bytes are each collective's result size per device. Collectives inside a
  while loop (gradient accumulation's scan) count once per trip, when XLA knows
  the trip count.
  """
  trips: dict[str, int] = {}
  for match in re.finditer(r'while\([^\n]*?body=%?([\w.\-]+)[^\n]*', hlo_text):
    count = re.search(r'"known_trip_count":\{"n":"(\d+)"', match.group(0))
    if count:
      trips[match.group(1)] = int(count.group(1))
  out: dict[str, dict[str, float]] = {}
  computation, factor = None, 1
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      computation = header.group(1)
      factor = trips.get(computation, 1)
      continue
    match = re.match(r'\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z\-]+)\(', line)
    if not match:
      continue
    kind = match.group(2)
    if kind.endswith('-done'):
      continue
    kind = kind[:-len('-start')] if kind.endswith('-start') else kind
    if kind not in _COLLECTIVES:
      continue
    entry = out.setdefault(kind, {'count': 0, 'bytes': 0})
    entry['count'] += factor
    entry['bytes'] += factor * _shape_bytes(match.group(1))
  return out


def _parse_size(text: str) -> Optional[float]:
  match = re.match(r'([\d.]+)\s*([KMGT]?)(?:i?B)?', text.strip())
  if not match:
    return None
  scale = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}[match.group(2)]
  return float(match.group(1)) * scale


def _oom_required_bytes(message: str) -> Optional[float]:
  """What XLA said the step needs, from its RESOURCE_EXHAUSTED message."""
  for pattern in (r'Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm',
                  r'total memory required for HLO temporaries \(([\d.]+[KMGT]?)\)',
                  r'requires ([\d.]+[KMGT]?)'):
    match = re.search(pattern, message)
    if match:
      return _parse_size(match.group(1))
  return None


# ---------------------------------------------------------------------------
# Planning.
# ---------------------------------------------------------------------------


def num_classes_for(config) -> int:
  """The dataset's class count without opening it: known metadata, else config.num_classes."""
  from vit_jax.configs import recipes  # pylint: disable=g-import-not-at-top
  return int(recipes.NUM_CLASSES.get(config.dataset, config.num_classes))


def compile_step(config, devices, overrides: dict[str, Any]) -> Compiled:
  """Builds `main`'s program for `devices` with `overrides` and compiles it."""
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  config = schema.replace(config, **overrides)
  program = train.build_program(config, num_classes_for(config),
                                train.run_mesh(config, devices))
  start = time.perf_counter()
  result = Compiled(dict(overrides), program=program)
  try:
    result.compiled = program.lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'exceeds available' not in message:
      raise
    result.oom_message = message.strip().splitlines()[0][:400]
    result.required_bytes = _oom_required_bytes(message)
  result.seconds = time.perf_counter() - start
  return result


def _usable_bytes(target, gpu_memory_fraction: float) -> float:
  memory = target.chip.memory_bytes
  return memory * gpu_memory_fraction if target.chip.platform == 'cuda' else memory


def analyse(result: Compiled, target, *, mfu: float, gpu_memory_fraction: float) -> dict:
  """The plan's figures for one compilation (per chip)."""
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top
  program, config = result.program, result.program.config
  chips = program.mesh.devices.size
  params = parallel.per_device_bytes(program.abstract_state.params,
                                     program.state_sharding.params)
  optimizer = parallel.per_device_bytes(program.abstract_state.opt_state,
                                        program.state_sharding.opt_state)
  usable = _usable_bytes(target, gpu_memory_fraction)
  out: dict[str, Any] = {
      'overrides': _field_value_strings(result.overrides),
      'mesh': parallel.mesh_shape(program.mesh),
      'num_chips': int(chips),
      'batch_size': int(config.batch_size),
      'grad_accum_steps': int(config.grad_accum_steps),
      'remat_policy': schema.model_config(config).get('remat_policy'),
      'dtype': config.dtype,
      'num_params': program.num_params,
      'hbm_bytes': int(target.chip.memory_bytes),
      'usable_bytes': int(usable),
      'compile_seconds': round(result.seconds, 1),
      'target': target.description, 'chip': target.chip.name,
      'peak_flops_per_chip': target.chip.peak_bf16_flops, 'mfu': mfu,
      'num_slices': target.num_slices, 'hosts': target.hosts,
      'model_name': config.model_name, 'image_size': list(config.image_size),
      'num_classes': program.num_classes,
  }
  try:
    model_config = schema.model_config(config)
    analytic = flops.vit_flops(model_config, image_hw(config.image_size),
                               program.num_classes, train=True)
    out['analytic_flops_per_step'] = analytic * config.batch_size / chips
  except ValueError:  # hybrid / ResNet / Mixer: no analytic count
    out['analytic_flops_per_step'] = None
  if result.compiled is None:
    out.update(fits=False, error=result.oom_message, flops_per_step=None,
               per_chip_bytes={'params': params, 'optimizer': optimizer, 'temp': None,
                               'total': result.required_bytes},
               step_seconds_at_mfu=None, images_per_second_at_mfu=None, collectives={})
    return out
  memory = result.compiled.memory_analysis()
  temp = int(memory.temp_size_in_bytes)
  total = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
              - memory.alias_size_in_bytes + temp)
  xla = flops.xla_flops(result.compiled)
  if xla and config.grad_accum_steps > 1:
    # XLA counts a while loop's body once: the accumulation loop runs it once per
    # micro-batch (the optimizer update outside the loop is then over-counted, by
    # well under 1% of a ViT step).
    xla *= int(config.grad_accum_steps)
  out['flops_per_step'] = xla
  out['per_chip_bytes'] = {'params': params, 'optimizer': optimizer, 'temp': temp,
                           'total': total, 'arguments': int(memory.argument_size_in_bytes)}
  out['fits'] = total <= usable
  if out['analytic_flops_per_step'] and xla:
    out['xla_over_analytic'] = xla / out['analytic_flops_per_step']
  work = out['analytic_flops_per_step'] or xla
  if work:
    seconds = work / (target.chip.peak_bf16_flops * mfu)
    out['step_seconds_at_mfu'] = seconds
    out['images_per_second_at_mfu'] = config.batch_size / seconds
  else:
    out['step_seconds_at_mfu'] = out['images_per_second_at_mfu'] = None
  out['collectives'] = collectives(result.compiled.as_text())
  return out


def _accum_options(config, chips: int) -> list[int]:
  """Gradient-accumulation counts that keep every micro-batch split over all chips."""
  batch = int(config.batch_size)
  return [a for a in (2, 4, 8, 16, 32, 64, 128)
          if a > int(config.grad_accum_steps) and batch % a == 0 and (batch // a) % chips == 0]


def _fsdp_options(mesh: dict[str, int]) -> list[int]:
  total = mesh['data'] * mesh['fsdp']
  out, fsdp = [], mesh['fsdp'] * 2
  while fsdp <= total:
    if total % fsdp == 0:
      out.append(fsdp)
    fsdp *= 2
  return out


def search(config, devices, target, base: dict, *, mfu: float, gpu_memory_fraction: float,
           log=print) -> tuple[Optional[dict], list[dict]]:
  """The cheapest overrides that fit: remat policy, then accumulation, then fsdp size.

  Returns (the fitting plan or None, every plan tried). State that cannot fit at
  the current fsdp size (params + optimizer above the chip's memory) goes
  straight to a larger fsdp axis.
  """
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  usable = _usable_bytes(target, gpu_memory_fraction)
  tried: list[dict] = []

  def attempt(overrides):
    log(f'  trying {" ".join(_quoted(o) for o in _field_value_strings(overrides))} ...')
    plan = analyse(compile_step(config, devices, overrides), target, mfu=mfu,
                   gpu_memory_fraction=gpu_memory_fraction)
    tried.append(plan)
    total = plan['per_chip_bytes']['total']
    log(f'    {"fits" if plan["fits"] else "does not fit"}'
        + (f' ({_gib(total)} of {_gib(usable)} GiB)' if total else ''))
    return plan

  overrides: dict[str, Any] = {}
  mesh = dict(base['mesh'])
  state = base['per_chip_bytes']['params'] + base['per_chip_bytes']['optimizer']
  # 1. Parameters + optimizer state alone (plus the gradients, as large as the
  #    parameters) must fit: otherwise only a larger fsdp axis helps.
  fsdp_sizes = _fsdp_options(mesh)
  while state + base['per_chip_bytes']['params'] > 0.8 * usable and fsdp_sizes:
    fsdp = fsdp_sizes.pop(0)
    factor = fsdp / mesh['fsdp']
    mesh = {'data': mesh['data'] * mesh['fsdp'] // fsdp, 'fsdp': fsdp}
    state /= factor
    overrides['mesh'] = _mesh_value(mesh)
  if overrides:
    plan = attempt(dict(overrides))
    if plan['fits']:
      return plan, tried
  # 2. Remat policies that keep less.
  current = schema.model_config(config).get('remat_policy') or 'none'
  policies = list(REMAT_ORDER[REMAT_ORDER.index(current) + 1:]) if current in REMAT_ORDER else []
  for policy in policies:
    overrides['model.remat_policy'] = policy
    plan = attempt(dict(overrides))
    if plan['fits']:
      return plan, tried
  # 3. Gradient accumulation, starting near the estimated need.
  last = tried[-1] if tried else base
  options = _accum_options(config, int(base['num_chips']))
  need = last['per_chip_bytes'].get('total')
  if need and options:
    fixed = state + base['per_chip_bytes']['params']
    ratio = max(1.0, (need - fixed) / max(usable - fixed, 1.0)) if usable > fixed else 1e9
    options = [a for a in options if a >= ratio / 2] or options[-1:]
  for accum in options:
    overrides['grad_accum_steps'] = accum
    plan = attempt(dict(overrides))
    if plan['fits']:
      return plan, tried
  overrides.pop('grad_accum_steps', None)
  # 4. A larger fsdp axis, with the strongest policy.
  for fsdp in _fsdp_options(mesh):
    mesh = {'data': mesh['data'] * mesh['fsdp'] // fsdp, 'fsdp': fsdp}
    overrides['mesh'] = _mesh_value(mesh)
    plan = attempt(dict(overrides))
    if plan['fits']:
      return plan, tried
  return None, tried


def _mesh_value(mesh: dict[str, int]) -> tuple:
  return tuple((name, size) for name, size in mesh.items() if size > 1) or (('data', 1),)


def _field_value_strings(overrides: dict[str, Any]) -> list[str]:
  return [f'{k}={v if isinstance(v, str) else repr(v).replace(" ", "")}'
          for k, v in overrides.items()]


def _gib(n: Optional[float]) -> str:
  return 'n/a' if n is None else f'{n / 2**30:.2f}'


def make_plan(config, target, devices, *, mfu: float = 0.5, gpu_memory_fraction: float = 0.75,
              do_search: bool = True, log=print) -> dict:
  """Compiles `config`'s step for `devices` of `target`; the plan as a JSON-able dict."""
  base_result = compile_step(config, devices, {})
  plan = analyse(base_result, target, mfu=mfu, gpu_memory_fraction=gpu_memory_fraction)
  plan.update(suggested_overrides=[], suggested_plan=None, searched=False)
  if not plan['fits'] and do_search:
    log(f'Does not fit ({_gib(plan["per_chip_bytes"]["total"])} GiB needed per chip, '
        f'{_gib(plan["usable_bytes"])} GiB usable); searching ...')
    plan['searched'] = True
    found, _ = search(config, devices, target, plan, mfu=mfu,
                      gpu_memory_fraction=gpu_memory_fraction, log=log)
    if found is not None:
      plan['suggested_overrides'] = found['overrides']
      plan['suggested_plan'] = found
  return plan


# ---------------------------------------------------------------------------
# Printing.
# ---------------------------------------------------------------------------


def _flops_text(n: Optional[float]) -> str:
  return 'n/a' if not n else f'{n / 1e12:.2f} TFLOP'


def report(plan: dict) -> str:
  b = plan['per_chip_bytes']
  lines = [
      f'{plan["model_name"]} ({plan["num_params"] / 1e6:.1f}M params, '
      f'{plan["num_classes"]} classes, {plan["image_size"][0]}x{plan["image_size"][1]}, '
      f'{plan["dtype"]}) on {plan["target"]}: {plan["num_chips"]} x {plan["chip"]}',
      f'mesh {plan["mesh"]}, global batch {plan["batch_size"]}'
      f' ({plan["batch_size"] // plan["num_chips"]} per chip), '
      f'{plan["grad_accum_steps"]} micro-batch(es), remat {plan["remat_policy"]}',
      'memory per chip (GiB):',
      f'  params {_gib(b["params"])}  optimizer {_gib(b["optimizer"])}  '
      f'temporaries {_gib(b["temp"])}  total {_gib(b["total"])}  of {_gib(plan["hbm_bytes"])}'
      f' ({_gib(plan["usable_bytes"])} usable): '
      + ('fits' if plan['fits'] else 'DOES NOT FIT'),
  ]
  if plan.get('error'):
    lines.append(f'  XLA: {plan["error"]}')
  ratio = plan.get('xla_over_analytic')
  lines.append(f'FLOPs per step per chip: XLA {_flops_text(plan["flops_per_step"])}, '
               f'analytic 3 x forward {_flops_text(plan["analytic_flops_per_step"])}'
               + (f' (XLA / analytic {ratio:.2f})' if ratio else ''))
  if plan.get('step_seconds_at_mfu'):
    lines.append(f'at {plan["mfu"]:.0%} MFU of {plan["peak_flops_per_chip"] / 1e12:.0f} '
                 f'TFLOP/s: {plan["step_seconds_at_mfu"] * 1e3:.1f} ms per step, '
                 f'{plan["images_per_second_at_mfu"]:,.0f} images/s')
  if plan.get('collectives'):
    parts = [f'{k} x{int(v["count"])} {v["bytes"] / 2**20:,.1f} MiB'
             for k, v in sorted(plan['collectives'].items())]
    lines.append('collectives per step per chip: ' + ', '.join(parts))
  if plan.get('suggested_overrides'):
    lines.append('fits with: ' + ' '.join(_quoted(o) for o in plan['suggested_overrides']))
  elif not plan['fits'] and plan.get('searched'):
    lines.append('no override searched fits')
  elif not plan['fits'] and 'searched' in plan:
    lines.append('no override searched (--nosearch)')
  return '\n'.join(lines)


def _quoted(override: str) -> str:
  key, _, value = override.partition('=')
  return f'--config.{key}="{value}"' if '(' in value else f'--config.{key}={value}'


def _define_flags() -> None:
  """The command line (defined when run as a program, so that importing this module
  beside vit_jax.main, which defines --config too, is possible)."""
  config_flags.DEFINE_config_file(
      'config', None, 'Training config file (configs/*.py[:argument]), as for vit_jax.main.',
      lock_config=True)
  flags.DEFINE_string('topology', None, 'Cloud TPU topology: v4:2x2x2, v5e:4x4, v5p:4x4x4, '
                      'v6e:16x16, ...')
  flags.DEFINE_integer('num_slices', 1, 'TPU slices joined over the data-centre network.')
  flags.DEFINE_enum('gpu', None, ['a100', 'h100', 'h200'], 'GPU model of the target nodes.')
  flags.DEFINE_integer('gpus_per_node', 8, 'GPUs per node (--gpu).')
  flags.DEFINE_integer('nodes', 1, 'Nodes (--gpu).')
  flags.DEFINE_float('mfu', 0.5, 'Model FLOPs utilisation assumed for the predicted step time.')
  flags.DEFINE_float('gpu_memory_fraction', 0.75,
                     "Share of a GPU's memory the run may use: JAX's default preallocation "
                     '(XLA_PYTHON_CLIENT_MEM_FRACTION) is 0.75.')
  flags.DEFINE_bool('search', True, 'When the step does not fit, search overrides that fit.')
  flags.DEFINE_string('json', None, 'Also write the plan as JSON to this file.')
  flags.DEFINE_bool('verbose', False, 'On an error, also print its traceback.')


def _target_from_flags():
  from vit_jax import accelerators  # pylint: disable=g-import-not-at-top
  if bool(FLAGS.topology) == bool(FLAGS.gpu):
    raise cli.UserError('give one target: --topology=v5e:4x4 (Cloud TPU) or --gpu=h100 '
                        '--gpus_per_node=8 [--nodes=N]')
  given = [name for name in ('num_slices', 'gpus_per_node', 'nodes') if FLAGS[name].present]
  other = [name for name in given if (name == 'num_slices') == bool(FLAGS.gpu)]
  if other:
    raise cli.UserError(f'--{other[0]} does not apply to --{"gpu" if FLAGS.gpu else "topology"}'
                        ' (TPU: --num_slices; GPU: --gpus_per_node, --nodes)')
  if FLAGS.topology:
    target = accelerators.tpu_target(FLAGS.topology, FLAGS.num_slices)
    devices = accelerators.tpu_devices(FLAGS.topology, FLAGS.num_slices)
  else:
    target = accelerators.gpu_target(FLAGS.gpu, FLAGS.gpus_per_node, FLAGS.nodes)
    devices = accelerators.gpu_devices(FLAGS.gpu, FLAGS.gpus_per_node, FLAGS.nodes)
  return target, devices


def main(argv):
  if len(argv) > 1:
    cli.refuse_positional(argv[1:])
  if FLAGS.config is None:
    sys.exit(cli.report_user_error(cli.UserError('--config is required (see --help)')))
  try:
    if not 0 < FLAGS.mfu <= 1:
      raise cli.UserError(f'--mfu must be in (0, 1], got {FLAGS.mfu}')
    if not 0 < FLAGS.gpu_memory_fraction <= 1:
      raise cli.UserError('--gpu_memory_fraction must be in (0, 1], got '
                          f'{FLAGS.gpu_memory_fraction}')
    if FLAGS.json:  # before minutes of compiling, not after
      if os.path.isdir(FLAGS.json):
        raise cli.UserError(f'--json {FLAGS.json!r} is a directory; name the file to write')
      os.makedirs(cli.check_writable_dir(os.path.dirname(os.path.abspath(FLAGS.json)),
                                         '--json'), exist_ok=True)
    from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
    config = schema.resolve(FLAGS.config)
    target, devices = _target_from_flags()
    print(f'Compiling the train step of {config.model_name} for {target.description} '
          f'({len(devices)} compile-only devices) ...', flush=True)
    plan = make_plan(config, target, devices, mfu=FLAGS.mfu,
                     gpu_memory_fraction=FLAGS.gpu_memory_fraction, do_search=FLAGS.search,
                     log=lambda text: print(text, flush=True))
  except Exception as e:  # pylint: disable=broad-except
    if not cli.is_user_error(e):
      raise
    sys.exit(cli.report_user_error(e, FLAGS.verbose))
  print(report(plan))
  if plan.get('suggested_plan'):
    print('\nwith those overrides:\n' + report(plan['suggested_plan']))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(plan, f, indent=1, default=float)
    print(f'Wrote {FLAGS.json}')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config'])
  cli.quiet_console()
  app.run(main, flags_parser=cli.parse_absl_flags)
