"""CACE-Net models: ResNet backbones, clue alignment, pair GCN and the full network.

`build_model(config.model, num_classes)` is how every command makes a model.
"""

from cace_jax.models.attention import ADJACENCY_KINDS, ClueAttention, cross_block, make_adjacency
from cace_jax.models.cacenet import PAIR_PATHS, POOLINGS, CACENet, GeM, build_model, pool_nodes
from cace_jax.models.gcn import GCN_KINDS, PairGCN, graph_operator, propagate_pair
from cace_jax.models.layers import Conv1x1, l2_normalize
from cace_jax.models.resnet import (
  RESNET_SPECS,
  NonLocal,
  ResNet,
  feature_map_shape,
  make_resnet,
  non_local_positions,
  output_channels,
)

__all__ = [
  'ADJACENCY_KINDS',
  'CACENet',
  'ClueAttention',
  'Conv1x1',
  'GCN_KINDS',
  'GeM',
  'NonLocal',
  'PAIR_PATHS',
  'POOLINGS',
  'PairGCN',
  'RESNET_SPECS',
  'ResNet',
  'build_model',
  'cross_block',
  'feature_map_shape',
  'graph_operator',
  'l2_normalize',
  'make_adjacency',
  'make_resnet',
  'non_local_positions',
  'output_channels',
  'pool_nodes',
  'propagate_pair',
]
