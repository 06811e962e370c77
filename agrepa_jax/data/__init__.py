"""The data path: corpus listings, the feature store, and the reader (docs/data.md)."""

from agrepa_jax import console


class DataError(console.UsageError, ValueError):
  """A corpus, store or data setting the data path cannot use; the message names the file or the
  config key. The command line prints it as one error line and exits with status 2."""
