"""Study `occlusion`: does the pair stage pay where the paper motivates it, on occluded queries?

  python benchmarks/ablations.py --study=occlusion --seeds=0,1,2,3,4,5,6,7   # 16 trainings, ~2 h

Individual only and CACE-Net (the official form) trained and tested on
`synthetic_details/occluded`, with the same seeds; CACE-Net scored by its
individual embedding, by stage 2 on every query, and by stage 2 on the
least confident queries only (the fraction chosen on validation).
"""


def get_study() -> dict:
  return {
    'config': 'configs/synthetic_occluded.py',
    'rows': {
      'individual': {'model.gcn': 'none'},
      'cacenet': {},
    },
  }
