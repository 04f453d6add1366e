"""Converting ViT weights to and from PyTorch: timm and Hugging Face transformers.

This module is the command line and `convert_file` (read, convert, write beside,
verify, then replace); the conversions live in modules of their own and are
kept importable from here:

- `vit_jax.torch_layout`: the key table shared by timm and HF, torch's
  (out, in) kernels, fused qkv, the GELU forms, what cannot be expressed;
- `vit_jax.convert_timm`: ours <-> timm (`to_timm`, `from_timm`, ViT and Mixer);
- `vit_jax.convert_hf`: ours <-> HF transformers (`to_hf`, `from_hf`);
- `vit_jax.torch_files`: .pth / .bin / safetensors files and HF directories;
- `vit_jax.convert_verify`: the logits check of a written file.

CLI:
  python -m vit_jax.convert --from timm --to npz --model ViT-B_16 --input vit.pth --output vit.npz
  python -m vit_jax.convert --from npz --to hf --model ViT-B_16 --input ViT-B_16.npz --output hf_dir/
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import sys
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import release_names
from vit_jax.convert_hf import from_hf, to_hf
from vit_jax.convert_timm import from_timm, to_timm
from vit_jax.convert_verify import (
    VERIFY_TOLERANCE, _geometry, _outputs, compare_outputs, our_outputs,
    verification_images)
from vit_jax.torch_files import read_torch_file, write_hf_directory, write_torch_file
from vit_jax.torch_layout import (
    _get, _with_approximate_gelu, check_against_config, hf_directory_uses_tanh_gelu,
    is_mixer_config, pytorch_model_config, uses_tanh_gelu)

# The API as users import it from here, defined in the modules named in the docstring.
from vit_jax.torch_layout import (  # pylint: disable=unused-import
    LAYER_NORM_EPSILON, HF_LAYOUTS)
from vit_jax.convert_timm import (  # pylint: disable=unused-import
    mixer_timm_kwargs, build_timm_mixer, timm_kwargs, build_timm_model)
from vit_jax.convert_hf import (  # pylint: disable=unused-import
    installed_hf_layout, hf_config_dict, build_hf_model, torch_state_dict)
from vit_jax.convert_verify import (  # pylint: disable=unused-import
    VERIFY_BATCH, timm_outputs, hf_outputs)


# ---------------------------------------------------------------------------
# Converting a file, and the command line
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Conversion:
  """What `convert_file` did: our params, and each check's max |logit difference|."""
  params: dict
  checks: dict[str, float]


def _staging_path(output_path: str) -> str:
  """A sibling of `output_path` ending in the same name (the format goes by suffix)."""
  directory, base = os.path.split(os.path.abspath(output_path))
  return os.path.join(directory, f'.partial-{os.getpid()}-{base}')


def _write_error(error: BaseException, output_path: str) -> BaseException:
  """An OSError naming the user's `output_path` (not the staging file) for a failed write.

  torch.save reports a full or read-only disk as a RuntimeError of its zip
  writer ('unexpected pos ...', 'open file failed with strerror: ...').
  """
  if isinstance(error, OSError):
    number = error.errno
  else:
    text = str(error)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(output_path))).free
    if 'Read-only file system' in text:
      number = errno.EROFS
    elif 'Permission denied' in text:
      number = errno.EACCES
    elif 'No space left' in text or 'unexpected pos' in text or free < (1 << 20):
      number = errno.ENOSPC
    else:
      return error
  if number is None:
    return error
  return OSError(number, os.strerror(number), output_path)


def _remove(path: str) -> None:

  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def _install(staging: str, output_path: str) -> None:
  """Moves the checked output into place; an existing directory keeps other files."""
  if os.path.isdir(staging) and os.path.isdir(output_path):
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(output_path, name))
    os.rmdir(staging)
  else:
    os.replace(staging, output_path)


def _read_input(source: str, input_path: str, config: Any) -> dict:
  """Our params from the input, checked against `config` before its data is read where possible."""
  if source == 'npz':
    # Every key and shape is checked from the .npy headers first.
    specs = checkpoint.read_npz_specs(input_path)
    check_against_config(specs, config, 'npz', input_path)
    params = checkpoint.load(input_path)
  elif source == 'timm':
    params = from_timm(read_torch_file(input_path), config)
  elif source == 'hf':
    params = from_hf(read_torch_file(input_path), config)
  else:
    raise ValueError(f'Unknown source format {source!r}')
  # A torch file may hold int / NaN weights that the layout mapping carries over.
  checkpoint.check_weights(params, f'{source} weights {input_path!r}')
  return params


def _write_output(target: str, params: Mapping, config: Any, output_path: str,
                  as_file: bool) -> None:
  if target == 'npz':
    checkpoint.save(params, output_path)
  elif target == 'timm':
    write_torch_file(to_timm(params, uses_tanh_gelu(config)), output_path)
  elif target == 'hf':
    if as_file:
      if uses_tanh_gelu(config):
        # A bare state dict has no config.json to carry hidden_act.
        logging.warning("%s holds no config: build its ViTConfig with "
                        "hidden_act='gelu_pytorch_tanh' (HF's default 'gelu' is exact GELU, "
                        'up to ~6e-4 off in logits)', output_path)
      write_torch_file(to_hf(params), output_path)
    else:
      labels = None
      if int(checkpoint.flatten(params)['head/kernel'].shape[-1]) == 1000:
        from vit_jax import labels as labels_lib  # pylint: disable=g-import-not-at-top
        labels = labels_lib.imagenet1k_labels()
      write_hf_directory(params, config, output_path, labels)
  else:
    raise ValueError(f'Unknown target format {target!r}')


def convert_file(source: str, target: str, model: str, input_path: str, output_path: str,
                 classifier: Optional[str] = None,
                 representation_size: Optional[int] = None, *,
                 verify: bool = True, tolerance: float = VERIFY_TOLERANCE) -> Conversion:
  """Reads `input_path` in format `source`, writes `output_path` in `target`.

  The input is checked against the `model` preset (every key and shape; for an
  .npz from its headers, before any data is read) and must hold finite float
  weights. The output is written under a temporary sibling name, read back
  with the target's own loader (timm, transformers, or `checkpoint.load`), and
  its logits compared with our model's on the input, on a fixed batch
  (`verification_images`), within `tolerance` x max(1, max |logit|); for timm /
  HF input, the input run by its own library is compared too. Only then is it
  renamed to `output_path`: a conversion that fails any check leaves nothing
  there. Both sides use the same GELU (the input's), so the comparison is of
  like with like.

  Raises:
    ValueError: the input does not fit the preset, or a check failed; the
      message names the keys, shapes or the difference.
    ImportError: the target's library, needed for the check, is missing.
  """
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  if source not in ('npz', 'timm', 'hf'):
    raise ValueError(f'Unknown source format {source!r}')
  if target not in ('npz', 'timm', 'hf'):
    raise ValueError(f'Unknown target format {target!r}')
  config = models_config.get_config(model)
  if is_mixer_config(config) and 'hf' in (source, target):
    raise ValueError(f'{model} is an MLP-Mixer: Hugging Face transformers has no Mixer; '
                     'convert it to or from timm or npz')
  if classifier:
    config.classifier = classifier
  if representation_size:
    config.representation_size = representation_size
  if source == 'hf' and hf_directory_uses_tanh_gelu(input_path):
    # A directory's config.json says which GELU its model computes (our own
    # exports of tanh models say 'gelu_pytorch_tanh').
    logging.info('%s: config.json says tanh GELU; keeping approximate_gelu=True', input_path)
    config = _with_approximate_gelu(config, True)
  elif source in ('timm', 'hf'):
    # Those weights were computed with exact GELU; exports keep saying so.
    config = pytorch_model_config(config)
    logging.info('%s weights compute exact GELU: our model needs approximate_gelu=False '
                 '(convert.pytorch_model_config) to reproduce them', source)
  params = _read_input(source, input_path, config)

  output_path = os.path.normpath(output_path)
  as_file = output_path.endswith(('.safetensors', '.bin', '.pt', '.pth'))
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  staging = _staging_path(output_path)
  _remove(staging)
  checks: dict[str, float] = {}
  try:
    try:
      _write_output(target, params, config, staging, as_file)
    except (OSError, RuntimeError) as e:
      raise _write_error(e, output_path) from e
    if verify:

      num_classes, image_size = _geometry(params, config)
      images = verification_images(image_size)
      reference = our_outputs(params, config, images)
      checks['output'] = compare_outputs(
          f'{output_path} read back by {target}', reference,
          _outputs(target, staging, config, num_classes, image_size, images), tolerance)
      # The input run by its own library, so that our reading of it is checked
      # too -- where the library can build the model (no representation layer;
      # HF's classifier model needs its head).
      if (source != 'npz' and not _get(config, 'representation_size')
          and (source == 'timm' or num_classes)):
        checks['input'] = compare_outputs(
            f'{input_path} run by {source}', reference,
            _outputs(source, input_path, config, num_classes, image_size, images), tolerance)
      logging.info('Checked %s: max |logit difference| %s (tolerance %g)', output_path,
                   ', '.join(f'{k} {v:.2g}' for k, v in checks.items()), tolerance)
    _install(staging, output_path)
  except BaseException:
    _remove(staging)
    raise
  return Conversion(params, checks)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(
      prog='python -m vit_jax.convert',

      description='Convert ViT weights between our .npz layout, timm and Hugging Face. '
                  'The input is checked against --model and the output against the input '
                  '(same logits on a fixed batch) before it is written.')
  parser.add_argument('--from', dest='source', required=True, choices=('timm', 'hf', 'npz'))
  parser.add_argument('--to', dest='target', required=True, choices=('npz', 'timm', 'hf'))
  parser.add_argument('--model', default=None,
                      help='preset name, e.g. ViT-B_16 (default for --from npz: from a '
                      'release file name, e.g. B_16-i21k-300ep-...npz or ViT-B_16.npz)')
  parser.add_argument('--input', required=True,
                      help='.npz, torch file (.pth/.bin), .safetensors, or a HF model directory')
  parser.add_argument('--output', required=True,
                      help='.npz; timm: .pth or .safetensors; hf: a directory (config.json + '
                           'model.safetensors) or a .safetensors/.bin file')
  parser.add_argument('--classifier', choices=('token', 'gap'), default=None,
                      help="override the preset's classifier (timm 'gap' models)")
  parser.add_argument('--representation_size', type=int, default=None,
                      help='size of the pre-logits layer, for weights that have one '
                           '(e.g. HF ViTModel poolers of ImageNet-21k checkpoints)')
  parser.add_argument('--tolerance', type=float, default=VERIFY_TOLERANCE,
                      help='largest max |logit difference| accepted, times max(1, max |logit|)')
  parser.add_argument('--no_verify', action='store_true',
                      help='write without reading the output back (e.g. without torch)')
  parser.add_argument('--verbose', action='store_true',
                      help=f'print the traceback of an error too (or set {cli.TRACEBACK_ENV}=1)')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    # Before the input is read and checked: an output that cannot be written.
    cli.check_writable_dir(os.path.dirname(os.path.abspath(args.output)),
                           f'--output {args.output!r}: its directory')
    model = (release_names.preset_for(args.input, args.model, required=True)
             if args.source == 'npz' else args.model)
    if model is None:
      raise ValueError(f'--from {args.source}: name the model with --model PRESET')
    result = convert_file(args.source, args.target, model, args.input, args.output,

                          args.classifier, args.representation_size,
                          verify=not args.no_verify, tolerance=args.tolerance)
  except (ValueError, OSError, ImportError, MemoryError) as e:
    # Bad input, a failed check, a missing library, a full disk: one line, exit 2.
    return cli.report_user_error(e, args.verbose)
  n = sum(int(np.prod(v.shape)) for v in checkpoint.flatten(result.params).values())
  checked = ('unchecked' if not result.checks else 'checked: max |logit difference| ' +
             ', '.join(f'{k} {v:.2g}' for k, v in result.checks.items()))
  print(f'Wrote {args.output} ({args.target}, {n:,} parameters; {checked})')
  return 0


if __name__ == '__main__':
  cli.quiet_console()  # before TensorFlow and JAX's backends load
  sys.exit(cli.run(main))
