"""Paper Table 3 (Market-1501): the mix-up weight α of the conditional ID loss.

python train.py --config configs/ablations/table3.py:0.9 --workdir runs/t3_a090
(α in 1.0 (plain cross entropy), 0.95, 0.9, 0.8, 0.7, 0.6)

"""

from configs.ablations import paper

ALPHAS = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6)


def get_config(arg='0.9'):
  """`arg`: α as a number in [0.5, 1]."""
  alpha = float(arg or 0.9)
  if not 0.5 <= alpha <= 1.0:
    raise ValueError(f'table3 alpha {alpha}: expected a value in [0.5, 1] such as {ALPHAS}')
  config = paper.get_config('market1501')
  config.loss.alpha = alpha
  return config
