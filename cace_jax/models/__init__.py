"""CACE-Net models: ResNet backbones, clue alignment, pair GCN and the full network.

`build_model(config.model, num_classes)` is how every command makes a model.
"""

from cace_jax.models.attention import (
  ADJACENCIES,
  ClueAttention,
  adjacency_kinds,
  cross_block,
  get_adjacency,
  make_adjacency,
  register_adjacency,
)
from cace_jax.models.build import build_model
from cace_jax.models.cacenet import PAIR_PATHS, CACENet
from cace_jax.models.gcn import (
  OPERATORS,
  PairGCN,
  gcn_kinds,
  get_operator,
  graph_operator,
  propagate_pair,
  register_operator,
)
from cace_jax.models.layers import Conv1x1, l2_normalize
from cace_jax.models.pooling import POOLINGS, GeM, pool_nodes
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
  'ADJACENCIES',
  'CACENet',
  'ClueAttention',
  'Conv1x1',
  'GeM',
  'NonLocal',
  'OPERATORS',
  'PAIR_PATHS',
  'POOLINGS',
  'PairGCN',
  'RESNET_SPECS',
  'ResNet',
  'adjacency_kinds',
  'build_model',
  'cross_block',
  'feature_map_shape',
  'gcn_kinds',
  'get_adjacency',
  'get_operator',
  'graph_operator',
  'l2_normalize',
  'make_adjacency',
  'make_resnet',
  'non_local_positions',
  'output_channels',
  'pool_nodes',
  'propagate_pair',
  'register_adjacency',
  'register_operator',
]
