"""The measured figures of the docs, each a markdown table rendered from its JSON.

`benchmarks/tables.py` writes them into the pages; this module only knows how
each one looks. Every table ends with the date and the command that produced
its figures, read from the JSON (`benchmarks/common.save_report` records
both), so no page carries a date in its prose.
"""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'benchmarks', 'results')
STEP_NAMES = {
  'backbone': 'ResNet-50 backbone, train step',
  'cacenet_gem': 'CACE-Net (GeM, non-local), train step',
  'cacenet_avg': 'CACE-Net (average pooling, non-local), train step',
  'stage1': 'stage-1 extraction (embeddings + cache)',
}
TORCH_NAMES = {
  'backbone': 'torchvision resnet50',
  'cacenet_gem': 'official CACENET + compute_loss',
  'cacenet_avg': 'official CACENET (avgpool) + compute_loss',
  'stage1': "official CACENET.eval() forward, which also builds the batch's B² pair graphs",
}
VARIANT_NAMES = {
  'ynnpack': 'jaxlib default (YNNPACK convolutions)',
  'fast': 'cace_jax default (XLA convolutions)',
  'ynnpack_bf16': 'YNNPACK, bfloat16',
  'fast_bf16': 'XLA convolutions, bfloat16',
  'fast_onednn': '+ oneDNN custom call',
  'fast_eigen1': '+ single-threaded Eigen',
  'fast_concurrency': '+ concurrency-optimised scheduler',
}


def load(name: str) -> dict:
  """The JSON report `benchmarks/results/<name>`."""
  with open(os.path.join(RESULTS, name), encoding='utf-8') as f:
    return json.load(f)


def provenance(*names: str) -> str:
  """'Measured <date>: `<command>`' for each report, the line under a table."""
  lines = []
  for name in names:
    report = load(name)
    command = report.get('command')
    how = f': `{command}`' if command else ''
    lines.append(f'`{name}`, measured {report.get("date", "(undated)")}{how}.')
  return '\n\n' + '\n'.join(lines) if len(lines) == 1 else '\n\n' + '<br>\n'.join(lines)


def measured(pattern: str, names) -> str:
  """'`<pattern>`, measured <dates>.', the line under a table drawn from several reports."""
  dates = sorted({load(name).get('date', '(undated)') for name in names})
  return f'\n\n`{pattern}`, measured {", ".join(dates)}.'


def header(*columns: str) -> list[str]:
  return ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]


def cell(value, digits: int = 2) -> str:
  return '–' if value is None else f'{value:.{digits}f}'


def rows_of(report: dict, step: str) -> dict:
  return {k: v for k, v in report['results'][step].items() if isinstance(v, dict)}


def cpu_speed() -> str:
  """Step times: jaxlib's default, ours and PyTorch, with the ratios."""
  report = load('cpu_step.json')
  lines = header(
    'step',
    'images',
    'jaxlib default, s',
    'cace_jax default, s',
    'PyTorch, s',
    '× jaxlib default',
    '× PyTorch',
    'PyTorch runs',
  )
  for step in report['results']:
    rows = rows_of(report, step)
    images = report['shape']['stage1_batch' if step == 'stage1' else 'batch']
    ynnpack, fast, torch = (rows.get(k, {}).get('step_s') for k in ('ynnpack', 'fast', 'torch'))
    lines.append(
      f'| {STEP_NAMES[step]} | {images} | {cell(ynnpack)} | {cell(fast)} | {cell(torch)} | '
      f'{cell(ynnpack / fast if ynnpack and fast else None)} | '
      f'{cell(torch / fast if torch and fast else None)} | {TORCH_NAMES[step]} |'
    )
  return '\n'.join(lines)


def cpu_options() -> str:
  """Every variant's speed over ours and its accuracy against the float64 reference."""
  report = load('cpu_step_variants.json')
  shape = report['shape']
  lines = [
    f'Batch {shape["batch"]} at {shape["height"]}×{shape["width"]}, ResNet-{shape["depth"]}; '
    f'{report["date"]}, `{report["command"]}`.',
    '',
    *header(
      'step',
      'variant',
      's/step',
      '× cace_jax default',
      'gradient vs float64, max',
      'gradient vs float64, L2',
    ),
  ]
  for step in report['results']:
    rows = rows_of(report, step)
    fast_s = rows.get('fast', {}).get('step_s')
    for name, row in rows.items():
      if name not in VARIANT_NAMES:
        continue
      if 'step_s' not in row:
        lines.append(f'| {STEP_NAMES[step]} | {VARIANT_NAMES[name]} | failed | | | |')
        continue
      speed = f'{fast_s / row["step_s"]:.2f}' if fast_s else '–'
      lines.append(
        f'| {STEP_NAMES[step]} | {VARIANT_NAMES[name]} | {row["step_s"]:.2f} | {speed} | '
        f'{row.get("max_relative_to_float64", float("nan")):.1e} | '
        f'{row.get("l2_relative_to_float64", float("nan")):.1e} |'
      )
  return '\n'.join(lines)


MEMORY_RUNS = {
  'memory_growth_4000.json': 'OCDBT store; evaluation every 280 steps, log every 10',
  'memory_growth.json': 'OCDBT store; evaluation every 560 steps, log every 10',
  'memory_growth_no_eval.json': 'OCDBT store; no periodic evaluation, log every 10',
  'memory_growth_no_eval_no_log.json': 'OCDBT store; no periodic evaluation, log every 2000',
  'memory_growth_4000_zarr.json': 'zarr per array (the default); evaluation every 280 steps',
}
MEMORY_PARTS = {
  'memory_parts_pipeline.json': 'the tf.data stream alone',
  'memory_parts_step.json': 'device transfer + jitted step alone',
  'memory_parts_checkpoint.json': 'checkpoint saves, OCDBT store (per save)',
  'memory_parts_checkpoint_zarr.json': 'checkpoint saves, zarr per array (per save)',
  'memory_parts_spec_json.json': "tensorstore's `Spec.to_json()` alone (per call)",
}


def memory_growth() -> str:
  """Host RSS against the step over long tiny runs: the slope of a fitted line."""
  lines = header(
    'run', 'steps', 'RSS over the fit, MiB', 'slope, MiB / 1000 steps', 'residual std, MiB'
  )
  for name, label in MEMORY_RUNS.items():
    r = load(name)
    lines.append(
      f'| {label} | {r["steps"]:,} | {r["rss_mib_fit_start"]:.0f} → {r["rss_mib_fit_end"]:.0f} | '
      f'{r["slope_mib_per_1000_steps"]:+.1f} | {r["residual_std_mib"]:.1f} |'
    )
  return '\n'.join(lines) + measured('memory_growth*.json', MEMORY_RUNS)


def memory_parts() -> str:
  """One part of the training loop alone: RSS slope and live Python blocks per step."""
  lines = header('part', 'steps', 'RSS slope, MiB / 1000 steps', 'live Python blocks per step')
  for name, label in MEMORY_PARTS.items():
    r = load(name)
    blocks = r.get('python_blocks_per_step')
    lines.append(
      f'| {label} | {r["steps"]:,} | {r["slope_mib_per_1000_steps"]:+.2f} | '
      f'{"–" if blocks is None else f"{blocks:+.1f}"} |'
    )
  return '\n'.join(lines) + measured('memory_parts_*.json', MEMORY_PARTS)


def eval_cost() -> str:
  """Stage 2's cost against stage 1's at Market-1501 size, per pooling and K."""
  report = load('eval_cost.json')
  ks = [str(k) for k in report['ks']]
  lines = header(
    'pooling',
    'stage 1, s per image',
    'stored cache, KiB per image',
    *(f'stage 2 / stage 1, K = {k}' for k in ks),
    'MSMT17 cache, GB',
  )
  for pooling, found in report['poolings'].items():
    ratios = ' | '.join(f'{100 * found["stage2_over_stage1_market"][k]:.1f}%' for k in ks)
    lines.append(
      f'| {pooling} | {found["stage1_s_per_image"]:.3f} | '
      f'{found["stored_cache_bytes_per_image"] / 1024:.0f} | {ratios} | '
      f'{found["stored_cache_gb_msmt17"]:.1f} |'
    )
  stream = report['streaming']
  lines.append(
    f"\nGathering a query's K = 10 cache rows: {1000 * stream['memory_s_per_query']['10']:.1f} ms "
    f'from memory, {1000 * stream["disk_cold_s_per_query"]["10"]:.1f} ms from cold memory-mapped '
    f'files; ranking metrics for 3,368 × 15,913: {report["metric_s_market"]:.1f} s.'
  )
  return '\n'.join(lines) + provenance('eval_cost.json')


def deploy_speed() -> str:
  """onnxruntime against JAX on the exported models."""
  r = load('deploy_speed.json')
  lines = header('model', 'onnxruntime, ms', 'JAX, ms', 'onnxruntime / JAX')
  for key, label in (
    ('features_s_per_image', f'features, per image (batch {r["batch"]})'),
    ('pair_s_per_pair', f'pair, per pair ({r["pairs"]} pairs)'),
  ):
    ort, jax_s = r[key]['onnxruntime'], r[key]['jax']
    lines.append(f'| {label} | {1000 * ort:.1f} | {1000 * jax_s:.1f} | {ort / jax_s:.2f} |')
  size = '×'.join(map(str, r['image_size']))
  return f'`{r["config"]}` at {size}.\n\n' + '\n'.join(lines) + provenance('deploy_speed.json')


MULTIHOST_RUNS = {
  'multihost_eval_resnet50.json': 'ResNet-50 at 256×128, K = 10',
  'multihost_eval_k5.json': "the demo's model, K = 5",
  'multihost_eval_k100.json': "the demo's model, K = 100",
}


def multihost_eval() -> str:
  """eval.py in one process against two over gloo: wall time and the split of the work."""
  lines = header(
    'model',
    'one process, s',
    'two processes, s',
    'two / one',
    'pairs scored per process',
    'largest metric difference',
  )
  for name, label in MULTIHOST_RUNS.items():
    r = load(name)
    pairs = r['info']['two_processes'].get('stage2_pairs_scored_by_process', [])
    lines.append(
      f'| {label} | {r["median_seconds"]["one_process"]:.0f} | '
      f'{r["median_seconds"]["two_processes"]:.0f} | {r["two_over_one"]:.2f} | '
      f'{" / ".join(map(str, pairs))} | {r["largest_metric_difference"]} |'
    )
  return '\n'.join(lines) + measured('multihost_eval_*.json', MULTIHOST_RUNS)


def device_check_cpu() -> str:
  """The accelerator check at full size on this CPU: step, memory and stage-2 figures."""
  train = load('device_check_cpu_full_train.json')
  lines = header(
    'variant',
    'GFLOP per step',
    'step, s',
    'step / backbone',
    'program memory, GiB',
    'compile, s',
  )
  for variant, r in train['train'].items():
    lines.append(
      f'| {variant} | {r["gflop_per_device_step"]:.0f} | {r["step_s"]:.1f} | '
      f'{r["step_over_backbone"]:.2f} | {r["program_memory_bytes"] / 2**30:.1f} | '
      f'{r["compile_s"]:.0f} |'
    )
  lines += ['', *header('pooling', 'cache, KiB per image', 'stage 2 at K = 100, ms per query')]
  evaluation = load('device_check_cpu_full_eval.json')['eval']
  for pooling in ('avg', 'gem'):
    r = evaluation[pooling]
    lines.append(
      f'| {pooling} | {r["cache_bytes_per_image"] / 1024:.0f} | '
      f'{r["stage2_ms_per_query_k100"]:.0f} |'
    )
  correctness = load('device_check_cpu_full_correctness.json')['correctness']
  gaps = ', '.join(
    f'{name.removeprefix("fast_vs_direct_")} {r["largest_relative_difference"]:.0e}'
    for name, r in correctness.items()
    if name.startswith('fast_vs_direct')
  )
  lines.append(f'\nFast against direct pair path, largest relative difference: {gaps}.')
  return '\n'.join(lines) + provenance(
    'device_check_cpu_full_train.json',
    'device_check_cpu_full_eval.json',
    'device_check_cpu_full_correctness.json',
  )


def throughput() -> str:
  """Input pipeline, model step and end-to-end training rates on this CPU."""
  pipeline = load('input_pipeline.json')
  step = load('model_step.json')['results']
  training = load('train_throughput.json')['images_per_s']
  size = '×'.join(map(str, pipeline['image_size']))
  lines = header('measure', 'figure')
  lines += [
    f'| tf.data training input at {size} | {pipeline["train_images_per_s"]:.0f} images/s |',
    f'| tf.data evaluation input at {size} | {pipeline["eval_images_per_s"]:.0f} images/s |',
  ]
  for name, label in (
    ('individual', 'individual heads only'),
    ('full_avg', 'CACE-Net, average pooling (all B² pairs)'),
    ('full_gem', 'CACE-Net, GeM'),
  ):
    lines.append(
      f'| ResNet-50 train step, {label}, over the backbone alone | '
      f'{step[name]["ratio_to_backbone"]:.2f}× |'
    )
  for name, rate in training.items():
    lines.append(f'| end-to-end training, `{name}` | {rate:.2f} images/s |')
  return '\n'.join(lines) + provenance(
    'input_pipeline.json', 'model_step.json', 'train_throughput.json'
  )


def official_parity() -> str:
  """One training forward of the official CACENET beside ours: every loss part."""
  r = load('official_parity.json')
  lines = header('loss part', 'official', 'cace_jax', 'relative difference')
  for part, found in r['losses'].items():
    gap = abs(found['ours'] - found['official']) / abs(found['official'])
    lines.append(f'| `{part}` | {found["official"]:.6f} | {found["ours"]:.6f} | {gap:.0e} |')
  lines.append(
    f'\nBatchNorm buffers compared: {r["buffers"]}; the largest relative gap, '
    f"{r['worst_gap']:.0e}, in `{r['worst_buffer']}`. Without the classifiers' in-place "
    f'ReLU the triplet would be {r["unrectified_triplets"]["triplet"]:.3f}.'
  )
  return '\n'.join(lines) + provenance('official_parity.json')
