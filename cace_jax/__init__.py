"""cace_jax: CACE-Net person re-identification in JAX.

`cace_jax.load(workdir)` gives a trained model to embed images, index a
gallery and search it; `cace_jax.load_index(directory)` reopens an index
(`cace_jax.serve.api`).
"""

from cace_jax import xla_flags as _xla_flags

# Before any submodule can start JAX's backend: XLA reads its flags only then.
_xla_flags.apply_default_xla_flags()


def __getattr__(name):
  # Lazy: importing a submodule (the models, the losses) does not pull in the API's imports.
  if name in ('load', 'load_index'):
    from cace_jax.serve import api  # pylint: disable=import-outside-toplevel

    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
