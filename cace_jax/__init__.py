"""cace_jax: CACE-Net person re-identification in JAX. `cace_jax.load(workdir)` (see `api`)."""

from cace_jax import xla_flags as _xla_flags

# Before any submodule can start JAX's backend: XLA reads its flags only then.
_xla_flags.apply_default_xla_flags()


def __getattr__(name):
  # Lazy: importing a submodule (the models, the losses) does not pull in the API's imports.
  if name == 'load':
    from cace_jax.api import load  # pylint: disable=import-outside-toplevel

    return load
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
