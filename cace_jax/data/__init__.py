"""Data: TFDS builders, the synthetic generator, tf.data input."""
