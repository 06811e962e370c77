"""Every test process sees 8 fake CPU devices, so sharding tests run anywhere."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Tests compile the same tiny programs many times; a persistent cache makes repeats cheap.
import jax  # noqa: E402

jax.config.update(
  'jax_compilation_cache_dir',
  os.path.join(os.environ.get('TMPDIR', '/tmp'), 'agrepa_jax_xla_cache'),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
