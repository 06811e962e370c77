"""Huge-page malloc: the environment it re-executes with, the re-execution, and its effect on the
page faults of a jitted function with a large scratch buffer."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from agrepa_jax import host_memory

needs_huge_pages = pytest.mark.skipif(
  not host_memory.huge_pages_supported(),
  reason='needs Linux, glibc >= 2.35 and transparent huge pages not set to never',
)


def test_environ_gains_the_tunable_and_keeps_the_rest():
  assert host_memory.huge_page_environ({'PATH': '/bin'}) == {
    'PATH': '/bin',
    'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1',
  }
  environ = host_memory.huge_page_environ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert environ['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'


@pytest.mark.parametrize(
  'tunables', ['glibc.malloc.hugetlb=0', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1']
)
def test_a_tunable_already_set_is_respected(tunables):
  assert host_memory.huge_page_environ({'GLIBC_TUNABLES': tunables}) is None


def run_python(code: str, **environ: str) -> str:
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    env={**env, **environ},
    capture_output=True,
    text=True,
    check=True,
  )
  return result.stdout


@needs_huge_pages
def test_the_process_reexecutes_itself_once_with_the_tunable():
  """In the environment it started with: what the first run set in os.environ is gone."""
  output = run_python("""
    import os, sys
    from agrepa_jax import host_memory
    print('started', os.environ.get('SET_AFTER_START'), flush=True)
    os.environ['SET_AFTER_START'] = '1'
    host_memory.reexec_with_huge_pages()
    print(os.environ['GLIBC_TUNABLES'])
  """)
  assert output.split('\n') == ['started None', 'started None', 'glibc.malloc.hugetlb=1', '']


@needs_huge_pages
def test_huge_pages_cut_the_page_faults_of_a_steps_scratch_buffer():
  """sin(x) of a 64 MiB x is a scratch buffer that XLA allocates on every call: 16 384 faults of
  4 KiB each with small pages, and at least 8 times fewer with huge pages."""
  code = """
    import json, resource
    import jax, jax.numpy as jnp
    x = jnp.ones((1024, 16384), jnp.float32)
    step = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ jnp.ones((16384, 8))))
    step(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
      step(x).block_until_ready()
    print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3))
  """
  small = json.loads(run_python(code, GLIBC_TUNABLES='glibc.malloc.hugetlb=0'))
  huge = json.loads(run_python(code, GLIBC_TUNABLES='glibc.malloc.hugetlb=1'))
  assert small >= 0.95 * (64 << 20) / 4096
  assert huge <= small / 8
