"""cace_jax: CACE-Net person re-identification in JAX. `cace_jax.load(workdir)` (see `api`)."""


def __getattr__(name):
  # Lazy: importing a submodule (the models, the losses) does not pull in the API's imports.
  if name == 'load':
    from cace_jax.api import load  # pylint: disable=import-outside-toplevel

    return load
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
