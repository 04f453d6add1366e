"""RandAugment (vit_jax.randaugment) against Pillow and the facts of AugReg's code, its
pipeline hook (deterministic, resumable) and the config fields that turn it on."""

import pytest

from vit_jax import randaugment as ra
from vit_jax import validation


@pytest.mark.parametrize('pp,message', [
    (dict(randaug=(2,)), 'config.pp.randaug'),
    (dict(randaug=(1.5, 10)), 'config.pp.randaug'),
    (dict(randaug=(2, -1)), 'config.pp.randaug'),
    (dict(randaug=(2, 10), randaug_ops=('Rotat',)), "'Rotat'"),
    (dict(randaug=(2, 10), randaug_ops=()), 'config.pp.randaug_ops'),
])
def test_bad_settings_are_refused_by_name(pp, message):
  with pytest.raises(ValueError, match=message):
    validation.validate_config(dict(model_name='ViT-Ti_16', image_size=32, pp=pp))


def test_settings():
  assert ra.check(None, None) is None and ra.check((0, 0), None) is None
  assert ra.check((2, 15), None) == (2, 15.0, ra.OPS)
  assert ra.check((1, 5), ('Cutout', 'Rotate', 'Cutout')) == (1, 5.0, ('Cutout', 'Rotate'))
  with pytest.raises(ValueError, match='mixup_form'):
    validation.validate_config(dict(model_name='ViT-Ti_16', image_size=32, mixup_form='roll'))
  config = validation.validate_config(dict(model_name='ViT-Ti_16', image_size=32,
                                           pp=dict(randaug=(2, 15)), mixup_form='augreg'))
  assert (config.pp.randaug, config.pp.randaug_ops, config.mixup_form) == ((2, 15), None,
                                                                           'augreg')
