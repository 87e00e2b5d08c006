"""Search a gallery folder with a trained model: python -m cace_jax.search --workdir RUN ...

  python -m cace_jax.search --workdir runs/synthetic --gallery GALLERY_DIR \
      --query QUERY_IMAGE_OR_DIR --out runs/synthetic/search

Indexes every image under --gallery (recursively; JPEG or PNG) into
<out>/index (resumable, reused when it matches), ranks it for every query
image (`api.ReID.search`), and writes <out>/results.json
({'queries': [{'query', 'stage2', 'hits': [...]}], 'stage2_k', 'stage2_mix',
'stage2_max_similarity', 'stage2_from'}; 'stage2': whether stage 2 re-sorted
that query) and one ranked-list figure per query, <out>/ranked_<n>.png.
Stage 2 is the one the run chose on its validation split, and none without
one; --stage2=config uses the run's configured stage 2 instead.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
import numpy as np
from PIL import Image

from cace_jax.commands import cli
from cace_jax.data.manual_source import IMAGE_SUFFIXES
from cace_jax.errors import DatasetError
from cace_jax.evaluation import figures, records
from cace_jax.serve import api


def define_flags(flag_values: flags.FlagValues) -> None:
  flags.DEFINE_string('workdir', None, 'The training run (or port).', flag_values=flag_values)
  flags.DEFINE_string('gallery', None, 'Folder of gallery images.', flag_values=flag_values)
  flags.DEFINE_string('query', None, 'A query image or a folder of them.', flag_values=flag_values)
  flags.DEFINE_string('out', None, 'Where results and figures go.', flag_values=flag_values)
  flags.DEFINE_integer('top_k', 10, 'Hits per query.', flag_values=flag_values)
  flags.DEFINE_integer('checkpoint', None, 'Step (default: latest).', flag_values=flag_values)
  flags.DEFINE_enum(
    'stage2',
    'validation',
    records.SERVING_POLICIES,
    "Stage 2 as the run chose it on validation, else none ('validation'), or as its config "
    "sets it ('config').",
    flag_values=flag_values,
  )
  flags.mark_flags_as_required(['workdir', 'gallery', 'query', 'out'], flag_values=flag_values)


def list_images(path: str, flag: str) -> list[str]:
  """`path` if it is an image, else every image under the folder `path`, sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise DatasetError(f'--{flag}={path}: no such file or folder')
  found = sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(path)
    for name in names
    if name.lower().endswith(IMAGE_SUFFIXES)
  )
  if not found:
    raise DatasetError(f'--{flag}={path}: no {", ".join(IMAGE_SUFFIXES)} images in it')
  return found


def read_rgb(path: str) -> np.ndarray:
  """An image file as uint8 [H, W, 3], for the figures."""
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def caption_of(hit: dict) -> str:
  """The distances under a hit's image: individual, and conditional with a pair stage."""
  text = f'{hit["individual_distance"]:.3f}'
  if 'conditional_distance' in hit:
    text += f' / {hit["conditional_distance"]:.3f}'
  return text


def search_folder(
  workdir: str,
  gallery: str,
  query: str,
  out: str,
  top_k: int = 10,
  step: int | None = None,
  stage2: str = 'validation',
) -> dict:
  """Indexes `gallery`, searches it for each image of `query`, writes results and figures.

  `stage2` is `api.load`'s: the run's validation choice, else stage 1 alone
  ('validation'), or its configured stage 2 ('config').
  """
  reid = api.load(workdir, step, stage2=stage2)
  gallery_paths, query_paths = list_images(gallery, 'gallery'), list_images(query, 'query')
  os.makedirs(out, exist_ok=True)
  index = reid.index(gallery_paths, os.path.join(out, 'index'))
  top_k = min(top_k, len(index))
  found = reid.search(query_paths, index, top_k)
  results = {
    'workdir': workdir,
    'step': reid.step,
    'stage2_k': reid.config.eval.stage2_k if reid.model.pair_stage else 0,
    'stage2_mix': reid.config.eval.stage2_mix,
    'stage2_max_similarity': reid.config.eval.stage2_max_similarity,
    'stage2_from': reid.stage2_from,
    'queries': [
      {'query': q, 'stage2': any(hit.get('resorted', False) for hit in hits), 'hits': hits}
      for q, hits in zip(query_paths, found)
    ],
  }
  with open(os.path.join(out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  size = tuple(reid.config.data.image_size)
  for n, (path, hits) in enumerate(zip(query_paths, found)):
    ranking = np.array([[hit['index'] for hit in hits]])
    captions = [[caption_of(hit) for hit in hits]]
    figures.plot_ranked_lists(
      [read_rgb(path)],
      lambda g: read_rgb(index.paths[g]),
      ranking,
      [0],
      np.zeros(len(index), int),
      [0],
      np.ones(len(index), int),
      os.path.join(out, f'ranked_{n}.png'),
      [0],
      top=top_k,
      titles=[os.path.basename(path)],
      valid_mask=np.ones((1, len(index)), bool),
      image_size=size,
      captions=captions,
    )
  return results


def main(args: flags.FlagValues, positional: list[str]) -> None:
  cli.expect_arguments(positional, [])
  results = search_folder(
    args.workdir, args.gallery, args.query, args.out, args.top_k, args.checkpoint, args.stage2
  )
  for entry in results['queries']:
    best = ', '.join(os.path.basename(hit['path']) for hit in entry['hits'][:3])
    print(f'{entry["query"]}: {best}, ...')
  print(f'wrote {os.path.join(args.out, "results.json")} and {len(results["queries"])} figures')


if __name__ == '__main__':
  sys.exit(cli.run(sys.argv, define_flags, main, __doc__))
