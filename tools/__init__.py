"""Commands beside train.py and eval.py: data, weights, deployment (`python tools/X.py`)."""
