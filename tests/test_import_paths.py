"""The import paths users rely on (README, docs, notebooks, benchmarks) stay where they are.

`checkpoint`, `convert` and `input_pipeline` are split into modules of their own;
each name below must still be importable from the module users import it from.
"""

import importlib

import pytest

PUBLIC = {
    'vit_jax.checkpoint': (
        'load', 'load_flat', 'save', 'inspect', 'load_pretrained', 'read_npz_specs',
        'flatten', 'unflatten', 'resize_posemb', 'abstract_params', 'check_params',
        'check_weights', 'normalize_layout', 'bit_to_params', 'params_to_bit',
        'is_bit_layout', 'resnet_architecture', 'bit_preset_name', 'guess_presets',
        'model_family', 'infer_grid', 'infer_image_size', 'patch_stride',
        'num_prefix_tokens', 'mixer_grid', 'widen_token_mixing', 'format_bytes',
        'max_npz_bytes', 'ArraySpec', 'ModelMismatchError', 'POSEMB_KEY', 'HEAD_KEYS',
        'MIXER_GRID_KEY', 'MAX_NPZ_BYTES_ENV', 'LAYOUTS'),
    'vit_jax.convert': (
        'main', 'convert_file', 'to_timm', 'from_timm', 'to_hf', 'from_hf',
        'pytorch_model_config', 'uses_tanh_gelu', 'timm_kwargs', 'build_timm_model',
        'build_timm_mixer', 'mixer_timm_kwargs', 'hf_config_dict', 'build_hf_model',
        'torch_state_dict', 'read_torch_file', 'write_torch_file', 'LAYER_NORM_EPSILON'),
    'vit_jax.input_pipeline': (
        'get_train_dataset', 'get_eval_dataset', 'get_dataset_info', 'iterate_numpy',
        'num_eval_batches', 'bad_images', 'write_bad_images', 'BadImageError',
        'DatasetInfo', 'BAD_IMAGE_POLICIES', 'IMAGE_FOLDER_PREFIX'),
    'vit_jax.cli': ('report_user_error', 'user_error_message', 'TRACEBACK_ENV'),
}


@pytest.mark.parametrize('module', sorted(PUBLIC))
def test_public_names_importable(module):
  mod = importlib.import_module(module)
  missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
  assert not missing, f'{module} lost {missing}'


def test_split_modules_import_without_tensorflow():
  """The checkpoint and conversion modules import without TensorFlow, as before the split."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys; import vit_jax.checkpoint, vit_jax.convert, vit_jax.input_pipeline; '
          'assert "tensorflow" not in sys.modules, "TensorFlow imported"')
  subprocess.run([sys.executable, '-c', code], check=True)
