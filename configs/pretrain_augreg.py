"""Pre-train a ViT with an AugReg recipe (Steiner et al. 2021; big_vision's vit_i21k / vit_i1k).

`--config=configs/pretrain_augreg.py:MODEL,DS[,AUG][,wd=W,do=D,sd=S][,runlocal]`:
MODEL a preset or release short name (`B_16`, `ViT-S_16`, `R26_S_32`), DS `i1k`,
`i21k` (default) or `i21k_30`, AUG `none`, `light1`, `light2`, `medium1`, `medium2`,
`strong1`, `strong2` (left out: big_vision's default level for the model); weight
decay (as the release's file names count it), dropout and stochastic depth from the
release grid. 300 epochs (i21k_30: 30), batch 4096, Adam with bf16 first moment,
lr 1e-3, 10k warm-up then cosine, clip 1, sigmoid loss, RandAugment + mixup
(`recipes.AUG_LEVELS`). ImageNet-21k is not in TFDS: see pretrain_imagenet21k.py.
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('augreg', None, arg)
