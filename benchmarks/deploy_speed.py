"""Speed of the exported models: onnxruntime against JAX on the same CPU, printed and saved.

  python benchmarks/deploy_speed.py   # the Market recipe (ResNet-50, GeM, non-local), 384×128

Builds the configured CACE-Net with random weights (speed does not depend on
them), writes its `features` and `pair` ONNX graphs (`cace_jax.interop.onnx_graph`)
and times, at the same batch size:
  * features: images -> embedding + maps, onnxruntime vs jitted JAX
    (`deployment.feature_function`, what the `jax.export` module runs);
  * pair: maps of K (query, gallery) pairs -> distances, onnxruntime (the
    dense 2n x 2n pair graph) vs jitted JAX (`deployment.pair_function`, the
    per-image-cache path).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile

from absl import flags
import jax
import numpy as np
import onnxruntime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import median_seconds, save_report  # pylint: disable=wrong-import-position
from cace_jax.commands import cli  # pylint: disable=wrong-import-position
from cace_jax.interop import deployment, onnx_graph  # pylint: disable=wrong-import-position
from cace_jax.models import build_model, feature_map_shape  # pylint: disable=wrong-import-position
from configs import market  # pylint: disable=wrong-import-position


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_integer('batch', 8, 'Images per call.', flag_values=flag_values)
  flags.DEFINE_integer('pairs', 10, 'K pairs per pair-model call', flag_values=flag_values)
  flags.DEFINE_integer('repeats', 3, 'Timed repeats (median).', flag_values=flag_values)
  flags.DEFINE_string(
    'out', 'benchmarks/results/deploy_speed.json', 'JSON report.', flag_values=flag_values
  )


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])

  config = market.get_config()
  image_size = tuple(config.data.image_size)
  model = build_model(config.model, num_classes=751)
  images = np.random.default_rng(0).uniform(0, 255, (args.batch, *image_size, 3)).astype(np.float32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), images[:1], train=False))()
  fmap_shape = feature_map_shape(image_size, model.depth, model.width, model.last_stride)

  with tempfile.TemporaryDirectory() as directory:
    paths = {name: os.path.join(directory, f'{name}.onnx') for name in ('features', 'pair')}
    graphs = {
      'features': onnx_graph.feature_graph(model, variables, image_size, flip=False),
      'pair': onnx_graph.pair_graph(model, variables, fmap_shape),
    }
    for name, graph in graphs.items():
      with open(paths[name], 'wb') as f:
        f.write(graph.SerializeToString())
    sessions = {
      name: onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
      for name, path in paths.items()
    }

    features = jax.jit(deployment.feature_function(model, variables, flip=False))
    _, fmap = features(images)
    fmap = np.asarray(fmap)
    index = np.arange(args.pairs) % args.batch
    query, gallery = fmap[np.zeros_like(index)], fmap[index]
    pair = jax.jit(deployment.pair_function(model, variables))
    report = {
      'config': 'configs/market.py',
      'image_size': list(image_size),
      'batch': args.batch,
      'pairs': args.pairs,
      'cpu_count': os.cpu_count(),
      'machine': platform.machine(),
      'jax': jax.__version__,
      'onnxruntime': onnxruntime.__version__,
      'load_average': os.getloadavg()[0],
      'features_s_per_image': {
        'onnxruntime': median_seconds(
          lambda: sessions['features'].run(None, {'images': images}), args.repeats
        )
        / args.batch,
        'jax': median_seconds(lambda: features(images), args.repeats) / args.batch,
      },
      'pair_s_per_pair': {
        'onnxruntime': median_seconds(
          lambda: sessions['pair'].run(None, {'fmap_query': query, 'fmap_gallery': gallery}),
          args.repeats,
        )
        / args.pairs,
        'jax': median_seconds(lambda: pair(query, gallery), args.repeats) / args.pairs,
      },
    }

  for part, unit in (('features_s_per_image', 'image'), ('pair_s_per_pair', 'pair')):
    timings = report[part]
    print(
      f'{part.split("_")[0]:>8}: onnxruntime {timings["onnxruntime"] * 1e3:8.2f} ms/{unit}, '
      f'JAX {timings["jax"] * 1e3:8.2f} ms/{unit} '
      f'(onnxruntime / JAX = {timings["onnxruntime"] / timings["jax"]:.2f})'
    )
  save_report(report, args.out)


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))
