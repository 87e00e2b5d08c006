"""Base of the ablations: the paper's pair-stage mechanism on the official head and losses.

What follows the paper's text (Sec. 3): correspondence attention on the raw
backbone map with diagonal W, W' (eq. 2-4, adjacency 'raw_correspondence'),
the discrepancy GCN (eq. 7), global average pooling before the 1x1
embedding, no non-local blocks.

What follows the official code instead, where the text is silent or says
less (with the flag that changes it, where there is one):
  * the embedding is 1x1 conv -> BatchNorm (the text: a 1x1 conv); there is
    no switch for the BN;
  * both classifiers are ReLU -> dropout 0.5 -> bias-free linear (the text
    does not say); `--config.model.dropout_rate=0` drops the dropout;
  * label smoothing 0.1 on the individual ID loss (the text: plain cross
    entropy, eq. 1); `--config.loss.label_smoothing=0`;
  * a batch-hard triplet loss on the B x B distances between f(u|v) and
    f(v|u) (not in the text); `--config.loss.weights.pair_triplet=0`;
  * both triplets on ReLU(embedding), as the official classifiers' in-place
    ReLU makes them (the text does not say);
    `--config.loss.rectified_triplets=False`.

  python train.py --config configs/ablations/paper.py:dukemtmc_reid --workdir runs/paper_duke

"""

from configs import default


def get_config(arg=None):
  """`arg`: TFDS dataset name (default dukemtmc_reid, the paper's ablation set)."""
  config = default.get_config()
  config.data.dataset = arg or 'dukemtmc_reid'
  config.model.adjacency = 'raw_correspondence'
  config.model.pooling = 'avg'
  config.model.non_local = False
  return config
