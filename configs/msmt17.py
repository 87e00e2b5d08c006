"""MSMT17 with the paper's recipe (Sec. 4.2) and the official model choices.

  python train.py --config configs/msmt17.py --workdir runs/msmt17
  python eval.py --config configs/msmt17.py --workdir runs/msmt17

Needs data/manual/ populated (see data/README.md) and an ImageNet ResNet-50:
  --config.init.backbone=/path/to/resnet50-0676ba61.pth
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.dataset = 'msmt17'
  return config
