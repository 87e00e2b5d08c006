"""Using a trained model: the Python API and the on-disk gallery index."""
