"""PyTorch weight files: `torch.save` files (read without unpickling code), safetensors, HF directories.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax import checkpoint
from vit_jax.convert_hf import hf_config_dict, to_hf, torch_state_dict
from vit_jax.torch_layout import _numpy_dict, _resolve


# ---------------------------------------------------------------------------
# Files and CLI
# ---------------------------------------------------------------------------

def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  if isinstance(obj, Mapping):
    for key in ('state_dict', 'model', 'module'):
      if key in obj and isinstance(obj[key], Mapping):
        return obj[key]
    return obj
  raise ValueError(f'{path!r} does not hold a state dict (got {type(obj).__name__})')


def read_torch_file(path: str) -> dict[str, np.ndarray]:
  """A state dict from a .safetensors file, a torch.save file, or a HF model directory."""
  if os.path.isdir(path):
    for name in ('model.safetensors', 'pytorch_model.bin'):
      candidate = os.path.join(path, name)
      if os.path.exists(candidate):
        return read_torch_file(candidate)
    raise ValueError(f'{path!r} holds neither model.safetensors nor pytorch_model.bin')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No such file: {path!r}')
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  _check_zip_size(path)
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Cannot read torch file {path!r}: {type(e).__name__}: {e}') from None
  return _numpy_dict(_unwrap(obj, path))


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors state dict; a bad file is a ValueError naming it.

  The format has no compression and its header's offsets must lie inside the
  file (safetensors checks), so the file's size bounds what a load allocates.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    try:
      return load_file(path)
    except (TypeError, ValueError):  # bfloat16 & co. have no numpy dtype
      from safetensors.torch import load_file as load_torch  # pylint: disable=g-import-not-at-top
      return _numpy_dict(load_torch(path))
  except (OSError, ImportError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # SafetensorError derives from Exception only.
    raise ValueError(f'Cannot read safetensors file {path!r}: not a valid .safetensors '
                     f'file ({type(e).__name__}: {e})') from None


def _check_zip_size(path: str) -> None:
  """torch.save files are zips: their declared size must be under the load limit."""
  import zipfile  # pylint: disable=g-import-not-at-top
  if not zipfile.is_zipfile(path):
    return
  try:
    with zipfile.ZipFile(path) as zf:
      total = sum(info.file_size for info in zf.infolist())
  except zipfile.BadZipFile as e:
    raise ValueError(f'Cannot read torch file {path!r}: {e}') from None
  limit = checkpoint.max_npz_bytes()
  if total > limit:
    raise ValueError(
        f'Torch file {path!r} declares {checkpoint.format_bytes(total)} of data, more than '
        f'the {checkpoint.format_bytes(limit)} limit for loading (raise it with '
        f'${checkpoint.MAX_NPZ_BYTES_ENV})')


def write_torch_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """.safetensors when the name says so, else torch.save of tensors."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
    return
  import torch  # pylint: disable=g-import-not-at-top
  # Through a file object: torch names the zip's inner folder 'archive', not
  # after the (temporary) file name.
  with open(path, 'wb') as f:
    torch.save(torch_state_dict(state_dict), f)


def write_hf_directory(params: Mapping, model_config: Any, path: str,
                       labels: Optional[Sequence[str]] = None) -> None:
  """A directory `ViTForImageClassification.from_pretrained` reads: config.json + model.safetensors."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = _resolve(model_config)
  flat = checkpoint.flatten(params)
  num_classes = int(flat['head/kernel'].shape[-1])
  image_size = checkpoint.infer_image_size(flat, config)
  fields = hf_config_dict(config, num_classes, image_size, labels)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(fields, f, indent=2)
  sd = to_hf(params, layout='classic')
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
            os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
