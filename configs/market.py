"""Market-1501 with the paper's recipe (Sec. 4.2) and the official model choices.

  python train.py --config configs/market.py --workdir runs/market
  python eval.py --config configs/market.py --workdir runs/market

Needs data/manual/ populated (see data/README.md) and an ImageNet ResNet-50:
  --config.init.backbone=/path/to/resnet50-0676ba61.pth
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.dataset = 'market1501'
  return config
