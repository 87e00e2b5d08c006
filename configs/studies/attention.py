"""Study `attention`: the adjacency of the pair graph, on the demo recipe.

  python benchmarks/ablations.py --study=attention --seeds=0,1,2   # 9 demo trainings, ~1 h

The official projected cosine (the demo's), the paper's eq. 2-4 on raw
features, and the same on L2-normalised pixels.
"""


def get_study() -> dict:
  return {
    'config': 'configs/synthetic.py',
    'rows': {
      'projected': {'model.adjacency': 'projected'},
      'raw_correspondence': {'model.adjacency': 'raw_correspondence'},
      'cosine_correspondence': {'model.adjacency': 'cosine_correspondence'},
    },
    'ordering': (),
  }
