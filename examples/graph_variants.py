"""Two graph variants of CACE-Net, registered from outside the package (docs/extending.md).

  python train.py --config configs/tiny.py --workdir runs/two_hop \
    --config.model.plugins=examples/graph_variants.py \
    --config.model.adjacency=mutual_topk --config.model.gcn=two_hop

* `mutual_topk`, an adjacency: pixel i of u and pixel j of v are linked only
  where each is among the other's `model.topk` most similar pixels (cosine of
  the backbone features). Unlike the built-in 'topk' (an edge where either
  picks the other), a pixel may end up with no cross-image edge at all.
* `two_hop`, a graph operator: F^2 with F = N (D - A) N, the discrepancy
  operator applied twice (a difference of differences, two hops away).

Each variant is one pure function registered by name; the model derives
every other form it needs from it (the dense graph, the fast pair stage, the
stage-2 cache, average pooling's readout). The ONNX forms below are the only
second definitions, for `tools/deploy.py`; without them training and
evaluation work and export refuses, naming the missing form.
"""

from cace_jax.interop import onnx_graph
from cace_jax.models import attention, gcn


def mutual_topk(query_u, key_v, p):
  """A_uv [n, m]: 1 where u's pixel i and v's pixel j are each among the other's top k."""
  similarity = attention.similarity(query_u, key_v)
  picked_by_u = attention.topk_mask(similarity, p['topk'])
  picked_by_v = attention.topk_mask(similarity.T, p['topk']).T
  return picked_by_u * picked_by_v


attention.register_adjacency('mutual_topk', keys=attention.pixel_keys, cross=mutual_topk)


@gcn.register_operator('two_hop', symmetric=True)
def two_hop(graph, z):
  """F^2 z with F the discrepancy operator (F is symmetric, so F^2 is too)."""
  once = gcn.OPERATORS['discrepancy'].apply
  return once(graph, once(graph, z))


@onnx_graph.register_onnx_adjacency('mutual_topk')
def mutual_topk_onnx(w, model, params, nodes, n):
  """Node i picks node j (the other image's top k); keep the edges picked both ways."""
  picks = onnx_graph.topk_picks(w, model, params, nodes, n)
  return w.op('Mul', picks, onnx_graph.transpose(w, picks))


@onnx_graph.register_onnx_operator('two_hop')
def two_hop_onnx(w, adjacency, n, relative_threshold):
  """F F, with F the dense discrepancy operator of each pair."""
  once = onnx_graph.ONNX_OPERATORS['discrepancy'](w, adjacency, n, relative_threshold)
  return w.op('MatMul', once, once)
