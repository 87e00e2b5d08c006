"""How far apart the paths of every registered adjacency x graph operator are: a printed matrix.

  python benchmarks/graph_conformance.py [--plugins=examples/graph_variants.py]

For each pair of kinds and each pooling (average: the readout shortcut; GeM:
conditional maps), on tiny backbone maps (3 images, 3x2 pixels, C = 32)
with every parameter moved off its init, the largest differences between:

  fast-direct   the fast pair stage and the materialised one: pair embeddings
                before BN (absolute), and gradients of a loss on them (each
                leaf over its largest entry);
  cache-dense   stage 2 from the compact image caches against the dense
                `pair_features` (f(u|v), absolute);
  onnx-jax      the exported pair model in onnxruntime against JAX (f(u|v),
                L2-normalised, absolute), where both kinds have an ONNX form.

`tests/test_graph_registry.py` asserts these under the suite's tolerances
(1e-4, 2e-4, 1e-4 relative / 1e-5, 1e-5); this script reports the figures.
Saves benchmarks/results/graph_conformance.json.
"""

from __future__ import annotations

import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import save_report  # pylint: disable=wrong-import-position
from cace_jax import plugins  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.errors import PortError  # pylint: disable=wrong-import-position
from cace_jax.interop import onnx_graph  # pylint: disable=wrong-import-position
from cace_jax.models import CACENet, attention, build_model, gcn  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, H, W, C = 3, 3, 2, 32


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'plugins',
    'examples/graph_variants.py',
    'Plugins whose kinds join the matrix (model.plugins syntax).',
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    'out',
    os.path.join(ROOT, 'benchmarks', 'results', 'graph_conformance.json'),
    'Where the JSON goes.',
    flag_values=flag_values,
  )


def model_of(adjacency: str, operator: str, **fields) -> CACENet:
  return build_model(
    dict(
      depth='tiny',
      width=1,
      embed_dim=8,
      num_classes=3,
      non_local=False,
      gcn_output_init=1.0,
      adjacency=adjacency,
      gcn=operator,
      topk=2,
      **fields,
    )
  )


def moved(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + 0.2 * jnp.asarray(rng.normal(size=x.shape), x.dtype), tree)


def differences(adjacency: str, operator: str, pooling: str, fmap) -> dict:
  """The largest gaps between the paths of one pair of kinds (see the module docstring)."""
  fast = model_of(adjacency, operator, pooling=pooling)
  direct = model_of(adjacency, operator, pooling=pooling, pair_path='direct')
  variables = fast.init(jax.random.key(0), fmap, method=CACENet.heads)
  variables = {**variables, 'params': moved(variables['params'], 1)}
  target = jax.random.normal(jax.random.key(3), (B, B, 8))

  def loss(params, model):
    out, _ = model.apply(
      {**variables, 'params': params},
      fmap,
      train=True,
      method=CACENet.heads,
      rngs={'dropout': jax.random.key(2)},
      mutable=['batch_stats'],
    )
    return jnp.sum(out['pair_pre_bn_uv'] * target), out['pair_pre_bn_uv']

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, pre_fast), grads_fast = step(variables['params'], fast)
  (_, pre_direct), grads_direct = step(variables['params'], direct)
  scaled_gap = lambda a, b: float(np.abs(np.asarray(a - b)).max() / (np.abs(b).max() + 1e-12))
  found = {
    'fast-direct embedding': float(np.abs(np.asarray(pre_fast - pre_direct)).max()),
    'fast-direct gradient': max(
      jax.tree.leaves(jax.tree.map(scaled_gap, grads_fast, grads_direct))
    ),
  }
  rolled = jnp.roll(fmap, 1, axis=0)
  dense = fast.apply(variables, fmap, rolled, method=CACENet.pair_features)
  cache = lambda x: fast.apply(variables, x, method=CACENet.compute_image_cache)
  pairs = fast.apply(variables, cache(fmap), cache(rolled), method=CACENet.embed_cached_pairs)
  found['cache-dense'] = float(
    np.abs(np.asarray(pairs['embedding_uv'] - dense['embedding_uv'])).max()
  )
  try:
    onnx_graph.check_exportable(fast)
  except PortError:  # no ONNX form: reported as such
    found['onnx-jax'] = None
    return found
  proto = onnx_graph.pair_graph(fast, variables, (H, W, C))
  session = onnxruntime.InferenceSession(
    proto.SerializeToString(), providers=['CPUExecutionProvider']
  )
  _, emb_qg, _ = session.run(
    None, {'fmap_query': np.asarray(fmap), 'fmap_gallery': np.asarray(rolled)}
  )
  unit = lambda e: np.asarray(e) / np.linalg.norm(e, axis=-1, keepdims=True)
  found['onnx-jax'] = float(np.abs(unit(emb_qg) - unit(dense['embedding_uv'])).max())
  return found


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  plugins.load(plugins.resolve(args.plugins))
  rng = np.random.default_rng(0)
  fmap = jnp.asarray(np.maximum(rng.normal(size=(B, H, W, C)), 0) + 0.05, jnp.float32)
  columns = ('fast-direct embedding', 'fast-direct gradient', 'cache-dense', 'onnx-jax')
  print('| adjacency | operator | pooling | ' + ' | '.join(columns) + ' |')
  print('|---|---|---|' + '---|' * len(columns))
  matrix = {}
  for adjacency in attention.adjacency_kinds():
    for operator in gcn.OPERATORS:
      for pooling in ('avg', 'gem'):  # the readout shortcut, and conditional maps
        found = differences(adjacency, operator, pooling, fmap)
        matrix[f'{adjacency}/{operator}/{pooling}'] = found
        cells = ['no ONNX form' if found[c] is None else f'{found[c]:.1e}' for c in columns]
        print(f'| {adjacency} | {operator} | {pooling} | ' + ' | '.join(cells) + ' |')
  worst = {c: max(f[c] for f in matrix.values() if f[c] is not None) for c in columns}
  print('largest: ' + ', '.join(f'{c} {v:.1e}' for c, v in worst.items()))
  save_report({'shape': [B, H, W, C], 'matrix': matrix, 'largest': worst}, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, usage=__doc__))
