"""Transparent huge pages for the large buffers that XLA allocates on every step.

On CPU, XLA allocates each execution's scratch buffer afresh (255 MB for the default config's
train step) and frees it when the step ends. glibc serves any request above 32 MB with a new
anonymous mapping and unmaps it on free, so every step faults the whole buffer in again, 4 KiB at
a time: 65 000 page faults and ≈ 0.18 s of kernel time per default step on a 2-core CPU. glibc's
tunable `glibc.malloc.hugetlb=1` (glibc ≥ 2.35) advises the kernel to back such mappings with
2 MiB transparent huge pages: 512 times fewer faults. Tunables are read once, when a process
starts, so the command line re-executes itself with the tunable set (docs/scaling.md).

GLIBC_TUNABLES=glibc.malloc.hugetlb=0 in the environment keeps the small pages and the process.
"""

import os
import pathlib
import platform
import sys
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
THP_SETTING = pathlib.Path('/sys/kernel/mm/transparent_hugepage/enabled')


def huge_page_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
  """`environ` with the huge-page tunable added to GLIBC_TUNABLES (kept with the others there),
  or None when GLIBC_TUNABLES already sets it, to any value."""
  tunables = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t]
  if any(t.split('=')[0] == TUNABLE for t in tunables):
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join([*tunables, f'{TUNABLE}=1'])}


def huge_pages_supported() -> bool:
  """Linux with glibc ≥ 2.35 (the tunable's first release) and transparent huge pages that a
  process may ask for (the kernel's setting is `always` or `madvise`, not `never`)."""
  libc, version = platform.libc_ver()
  if platform.system() != 'Linux' or libc != 'glibc':
    return False
  if tuple(int(p) for p in version.split('.')[:2]) < (2, 35):
    return False
  try:
    return '[never]' not in THP_SETTING.read_text()
  except OSError:
    return False


def startup_environ() -> dict[str, str]:
  """The environment this process started with (Linux keeps it in /proc/self/environ), without
  what imports have set in os.environ since (jax sets TF_CPP_MIN_LOG_LEVEL, and on Cloud TPU VMs
  its topology variables)."""
  entries = pathlib.Path('/proc/self/environ').read_bytes().split(b'\0')
  return dict(os.fsdecode(e).split('=', 1) for e in entries if b'=' in e)


def reexec_with_huge_pages() -> None:
  """Replaces this process with the same command line, in the environment it started with, under
  huge-page malloc. Returns (and the process goes on as it is) when the tunable is already set or
  the system cannot use it. Call it first thing, before any work worth keeping."""
  if not huge_pages_supported():
    return
  environ = huge_page_environ(startup_environ())
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
