"""Which images of held-out identities are queries: Market-1501's convention, in one place.

Used by the custom builder's seeded split of a single labelled set
(`folder_spec`) and by the validation split carved out of the training
identities (`split_data.hold_out_identities`), so both follow one rule.
"""

from __future__ import annotations

import numpy as np

# Datasets without cameras follow torchreid's convention: query and gallery
# are taken to be different cameras, so the same-camera rule of the
# evaluation protocol removes nothing. These are the camera ids they get.
NO_CAMERA_QUERY = 1
NO_CAMERA_GALLERY = 2


def choose_queries(
  pids: np.ndarray, camids: np.ndarray, file_names: np.ndarray, per_camera: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Splits the images of some identities into a query and a gallery set.

  With `per_camera`, each identity gives its first image (by file name) of
  every camera to the query and the rest to the gallery, as Market-1501 does;
  an identity seen by one camera only then has no cross-camera match and is
  left out of both. Without it, each identity gives its first image to the
  query (datasets without cameras; `per_camera` ignores `camids` then), and
  an identity of one image is left out.

  Args:
    pids, camids, file_names: [N] identity, camera and file name of each image.
    per_camera: one query per (identity, camera) rather than per identity.

  Returns:
    (is_query, is_gallery): [N] boolean masks, disjoint.
  """
  pids = np.asarray(pids)
  keys = (
    [(int(p), int(c)) for p, c in zip(pids, np.asarray(camids))]
    if per_camera
    else [(int(p), 0) for p in pids]
  )
  first = np.zeros(len(pids), bool)
  seen = set()
  for i in np.argsort(np.asarray(file_names, dtype=object).astype(str), kind='stable'):
    first[i] = keys[i] not in seen
    seen.add(keys[i])
  if per_camera:
    views = {}
    for pid, _ in seen:
      views[pid] = views.get(pid, 0) + 1
    usable = np.array([views[int(p)] >= 2 for p in pids], bool)
  else:
    ids, counts = np.unique(pids, return_counts=True)
    usable = np.isin(pids, ids[counts >= 2])
  return first & usable, ~first & usable
