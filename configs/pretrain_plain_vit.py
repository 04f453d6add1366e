"""ViT-S/16 on ImageNet-1k, "Better plain ViT baselines" (Beyer et al. 2022; big_vision vit_s16_i1k).

`--config=configs/pretrain_plain_vit.py[:EPOCHS][,runlocal]`, EPOCHS 90 (default:
76.5% top-1 reported), 150 or 300 (80%). Batch 1024, Adam with bf16 first moment,
lr 1e-3, weight decay 0.1 x lr on kernels, 10k warm-up then cosine, clip 1,
RandAugment (2, 10), mixup 0.2, global average pooling, fixed 2-D sin-cos position
embeddings, tanh representation layer, softmax loss, no dropout (`recipes.PLAIN_VIT`).
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('plain_vit', None, arg)
