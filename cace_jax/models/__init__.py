"""CACE-Net models: ResNet backbones, clue alignment, pair GCN and the full network."""

from cace_jax.models.attention import ADJACENCY_KINDS, ClueAttention, cross_block, make_adjacency
from cace_jax.models.cacenet import CACENet, GeM, POOLINGS, pool_nodes
from cace_jax.models.gcn import GCN_KINDS, Conv1x1, PairGCN, graph_operator, propagate_pair
from cace_jax.models.resnet import (RESNET_SPECS, NonLocal, ResNet, make_resnet,
                                    non_local_positions, output_channels)

__all__ = [
    'ADJACENCY_KINDS', 'CACENet', 'ClueAttention', 'Conv1x1', 'GCN_KINDS', 'GeM', 'NonLocal',
    'POOLINGS', 'PairGCN', 'RESNET_SPECS', 'ResNet', 'cross_block', 'graph_operator',
    'make_adjacency', 'make_resnet', 'non_local_positions', 'output_channels', 'pool_nodes',
    'propagate_pair',
]
