"""Train-step throughput, and the official PyTorch step beside it: one JSON line per config.

  python bench/train_step.py [--steps 3] [--rounds 5] [--configs default,paper_width]
      [--forms official|config] [--set model.remat=none ...] [--no-torch]
      [--huge_pages jax|both|none] [--profile] [--no-fog-a]

Each framework runs in a fresh subprocess of its own, so its memory is its own: the JAX step
(train.jit_train_step) and, on CPU, the same step in PyTorch eager on the re-implementation of the
official model (tests/reference/official.py: forward, the same three losses, backward, clipping,
AdamW) at the same dimensions, both float32. Timing is interleaved: `--rounds` rounds of `--steps`
steps, alternating the two frameworks (the order flips every round), so load from other jobs on
the machine hits both; a step's time is the median over rounds. `torch_over_jax` is
torch_step_seconds / step_seconds; `torch_over_jax_fastest_rounds` the ratio of the two
frameworks' fastest rounds (the least disturbed estimate on a shared machine). Each PyTorch round
runs with the faster of 1 and all threads, timed on one untimed step each at the round's start
(`torch_threads_per_round`): its OpenMP threads slow down ≈ 10× when another process holds a core.
Each JAX round likewise begins with one untimed step. The JAX worker runs with huge-page malloc,
as main.py does (agrepa_jax.host_memory; `--huge_pages both` gives it to PyTorch too, `none` to
neither); `*_glibc_tunables` say what each worker had.

Per config: compile seconds, steps/s, clips/s, matmul FLOPs per step (counted by hand,
agrepa_jax/flops.py; XLA's cost analysis counts the depth scan's body once, it is printed beside as
`xla_cost_analysis_flops_per_device`), achieved FLOP/s, MFU against the chip's dense bf16 peak on
known GPUs/TPUs (flops.CHIPS), and on CPU the achieved FLOP/s as a fraction of an f32 2048² matmul's
measured in the same JAX process (`fraction_of_matmul`). `--profile` adds `profile`: the ten
costliest ops or fusions by device time per step, from a `jax.profiler` trace of `--steps` steps.
Memory: per device, the allocator's peak where the device reports one, else the compiled step's
(`peak_memory_bytes`); and for each framework the
process's resident memory (Linux VmHWM): `*_baseline_rss_bytes` after importing the framework,
`*_peak_rss_bytes` the peak over the timed steps (the high-water mark is reset after the warm-up
step, so JAX's compilation is not in it; `jax_compile_peak_rss_bytes` has it), `*_step_rss_bytes`
that peak less the memory resident before the steps (what the step itself adds). A JAX process
keeps ≈ 0.25 GB of XLA's compiler heap after its first compile; `jax_cached_*` are the figures of
a second JAX worker that loads the train step from the persistent compilation cache the first one
wrote, as a rerun or a resumed run does (main.py --compilation_cache); it still compiles the jits
too quick to be cached (JAX caches compiles of ≥ 1 s). On accelerators, whose memory is the
allocator's, there is no such second worker.
`fog_a_fraction` is the share of training time that online AG-REPA spends re-measuring FoG-A every
repa.probe_every steps (`--no-fog-a` skips it). Batches are random arrays of the right shapes: no
data is read.

`--forms official` (the default) builds our model in the official forms so both frameworks
compute the same model: the paper configs' model keys (official time embedding, dropout on the
attention probabilities, after the GELU and after the MLP, per-domain tables, BiT-C without
affine) and, as the official step does, token conditioning without gradients
(model.frozen_token_conditioning). `--forms config` keeps the config's own forms.
"""

import argparse
import ast
import collections
import ctypes
import gc
import gzip
import importlib.util
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from agrepa_jax import host_memory  # noqa: E402

TEACHER_DIMS = {'speech': 384, 'audio': 384}  # Whisper tiny.en, the default config's teacher
OFFICIAL_FORMS = dict(
  token_tables='per_domain',
  time_embedding='official',
  dropout_positions='official',
  modulation_init='normal',
  frozen_token_conditioning=True,
)


# ----- Configs -----
def default_config():
  from agrepa_jax import config_base

  return config_base.config_from_file(str(ROOT / 'configs/default.py'))


def paper_width_config():
  """The paper's width, heads and token vocabulary with 4 blocks, 2 s clips, batch 8."""
  config = default_config()
  config.model.update(
    num_layers=4, width=1024, num_heads=16, token_dim=1024, vocab_size=4096, time_freq_dim=256
  )
  config.batch_size = 8
  return config


def medium_config():
  """8 blocks × 256, batch 8 of 4 s clips: the second shape the issue compared with PyTorch."""
  config = default_config()
  config.model.update(num_layers=8, width=256, num_heads=4, token_dim=256, time_freq_dim=128)
  config.repa.update(layers={'speech': [4], 'audio': [4]})
  config.data.clip_seconds = 4.0
  config.batch_size = 8
  return config


def paper_day_config():
  """configs/paper_day.py: 12 blocks × 512, batch 64 of 10 s clips, bf16, full remat."""
  from agrepa_jax import config_base

  return config_base.config_from_file(str(ROOT / 'configs/paper_day.py'))


def tiny_config():
  """2 blocks × 32, batch 8 of 0.5 s clips: the bench's own test."""
  config = default_config()
  config.model.update(num_layers=2, width=32, num_heads=2, token_dim=32, time_freq_dim=16)
  config.data.clip_seconds = 0.5
  config.batch_size = 8
  config.probe.update(num_clips=8, batch_size=8)
  return config


# paper_day is for accelerators: it is not in the default --configs.
CONFIGS = {
  'tiny': tiny_config,
  'default': default_config,
  'medium': medium_config,
  'paper_width': paper_width_config,
  'paper_day': paper_day_config,
}


def bench_config(name: str, forms: str, overrides: list[str]):
  config = CONFIGS[name]()
  for d in config.data.domains:
    config.teachers[d].dim = TEACHER_DIMS[d]
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  if forms == 'official':
    config.model.update(OFFICIAL_FORMS)
    config.bitc.form = 'official'
  elif forms != 'config':
    raise ValueError(f'--forms={forms!r}: expected official or config')
  for item in overrides:
    key, value = item.split('=', 1)
    *path, leaf = key.split('.')
    target = config
    for part in path:
      target = target[part]
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a bare string
    target[leaf] = value
  return config


# ----- Resident memory (Linux) -----
def rss_bytes(field: str = 'VmRSS') -> int:
  """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in bytes."""
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1]) * 1024
  return 0


def reset_peak_rss() -> None:
  """Returns freed heap to the system (glibc keeps it otherwise: the compiler's, say) and resets
  the high-water mark."""
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
  pathlib.Path('/proc/self/clear_refs').write_text('5')


# ----- The workers: one process per framework, driven over stdin/stdout -----
def serve(setup) -> None:
  """Announces the ready message of `setup()`, which returns it with the worker's handlers; then
  answers `round N` (the seconds the 'round' handler timed for N steps), `profile N` (the
  'profile' handler's costliest ops over N steps), `memory` (the peak resident memory since the
  last reset) and `finish`."""
  ready, handlers = setup()
  reply(ready)
  for line in sys.stdin:
    command, *args = line.split()
    if command == 'round':
      reply({'seconds': handlers['round'](int(args[0]))})
    elif command == 'profile':
      reply({'profile': handlers['profile'](int(args[0]))})
    elif command == 'memory':
      reply({'peak_rss_bytes': rss_bytes('VmHWM')})
    elif command == 'finish':
      reply(handlers['finish']())
      return


def reply(message: dict) -> None:
  sys.stdout.write(json.dumps(message) + '\n')
  sys.stdout.flush()


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an f32 n×n matmul on the first device: the practical peak a step can reach there."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(a).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def random_batch(config, mesh, seed: int = 0) -> dict:
  """Host arrays of one global batch of random clips with the batch contract's shapes."""
  import jax
  import numpy as np

  from agrepa_jax import aot, audio

  rng = np.random.default_rng(seed)
  abstract = aot.abstract_batch(config, aot.teacher_dims_from_config(config), mesh)
  full_clip = round(config.data.clip_seconds * audio.SAMPLE_RATE)
  ranges = {
    'domain': (0, len(config.data.domains)),
    'tokens': (0, config.model.vocab_size),
    'num_samples': (full_clip // 2, full_clip + 1),
  }

  def fill(path, spec):
    name = path[0].key
    if name in ranges:
      return rng.integers(*ranges[name], spec.shape).astype(spec.dtype)
    return rng.standard_normal(spec.shape).astype(spec.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


class RandomClips:
  """A held-out split of random clips: what probe.online.OnlineFogA reads."""

  def __init__(self, config, mesh, num_clips: int):
    import jax
    import numpy as np

    batch = random_batch(config, mesh, seed=1)
    self.rows = [
      jax.tree.map(lambda x, i=i: x[i % config.batch_size], batch) for i in range(num_clips)
    ]
    self.arrays = {'domain': np.asarray([r['domain'] for r in self.rows])}

  def __getitem__(self, i):
    return self.rows[i]

  def __len__(self):
    return len(self.rows)


def jax_setup(config, fog_a: bool = True, profile: bool = False):
  """The JAX worker's step on random batches; `fog_a`: time online FoG-A too; `profile`: on CPU,
  compile the step with the runtime's per-thunk trace events, for the 'profile' handler."""
  import jax

  from agrepa_jax import aot, flops, sharding, train
  from agrepa_jax import state as state_lib
  from agrepa_jax.probe.online import OnlineFogA

  jax.devices()
  baseline = rss_bytes()
  mesh = sharding.make_mesh(config.mesh)
  teacher_dims = aot.teacher_dims_from_config(config)
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, shardings = state_lib.sharded_init(config, teacher_dims, tx, mesh)
  step_cfg = train.StepConfig.from_config(config)
  step_fn = train.jit_train_step(graphdef, tx, schedule, step_cfg, shardings, mesh)
  host_batch = random_batch(config, mesh)
  batch = sharding.global_batch(host_batch, mesh)
  start = time.perf_counter()
  traced = profile and mesh.devices.flat[0].platform == 'cpu'
  options = {'xla_cpu_enable_xprof_traceme': True} if traced else None
  compiled = step_fn.lower(state, batch).compile(options)
  compile_seconds = time.perf_counter() - start
  state, parts = compiled(state, batch)  # one untimed step: buffers allocated, caches warm
  jax.block_until_ready(parts)
  matmul = matmul_flops_per_second()  # before the reset: its compile and arrays are not the step's
  compile_peak = rss_bytes('VmHWM')
  reset_peak_rss()
  trimmed = rss_bytes()

  frames, num_tokens = host_batch['mel'].shape[1], host_batch['tokens'].shape[2]
  step_flops = flops.config_train_step_flops(config, teacher_dims)
  device = jax.devices()[0]
  ready = {
    'device': device.device_kind,
    'platform': device.platform,
    'devices': jax.device_count(),
    'frames': frames,
    'tokens_per_clip': num_tokens,
    'compile_seconds': round(compile_seconds, 2),
    'flops_per_step': step_flops,
    'flops_per_step_per_device': step_flops / jax.device_count(),
    'xla_cost_analysis_flops_per_device': float(compiled.cost_analysis().get('flops', 0.0)),
    'compiled_peak_bytes': aot.memory_report(compiled)['peak_bytes'],
    'jax_baseline_rss_bytes': baseline,
    'jax_compile_peak_rss_bytes': compile_peak,
    'jax_rss_before_steps_bytes': trimmed,
    'jax_glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
    'matmul_flops_per_second': matmul,
  }
  holder = {'state': state, 'parts': parts}

  def steps(n):
    """n steps on from the last one, waited for."""
    state, parts = holder['state'], holder['parts']
    for _ in range(n):
      state, parts = compiled(state, batch)
    jax.block_until_ready(parts)
    holder.update(state=state, parts=parts)

  def run_steps(n):
    """One untimed step first, as PyTorch's thread trial: the round then times steps as they
    follow one another in training, not the first one after the other framework's round (on a
    VM, memory left free that long is much slower to fault in again; docs/scaling.md)."""
    steps(1)
    start = time.perf_counter()
    steps(n)
    return time.perf_counter() - start

  def profile(n):
    steps(1)
    with tempfile.TemporaryDirectory(prefix='bench_trace_') as trace_dir:
      with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        steps(n)
      (path,) = pathlib.Path(trace_dir).rglob('*.trace.json.gz')
      return costliest_ops(json.loads(gzip.decompress(path.read_bytes())), n)

  def finish():
    result = {
      'jax_peak_rss_bytes': rss_bytes('VmHWM'),
      'jax_final_rss_bytes': rss_bytes(),
      'allocator_peak_bytes': int((device.memory_stats() or {}).get('peak_bytes_in_use', 0)),
      'loss': float(holder['parts']['loss']),
      'matmul_flops_per_second_after': matmul_flops_per_second(),
      'fog_a_seconds': None,
    }
    if fog_a:
      online = OnlineFogA(config, RandomClips(config, mesh, config.probe.num_clips))
      jax.block_until_ready(online.reselect(holder['state'], graphdef, mesh).lambdas)
      start = time.perf_counter()
      jax.block_until_ready(online.reselect(holder['state'], graphdef, mesh).lambdas)
      result['fog_a_seconds'] = time.perf_counter() - start
    return result

  return ready, {'round': run_steps, 'profile': profile, 'finish': finish}


# A device's trace lines that span other lines' work (modules, steps, framework scopes).
SUMMARY_LINES = ('Module', 'Step', 'Framework', 'Source', 'Launch')
# An HLO instruction's name (dot.61, ynn_fusion.91), not a runtime span on the CPU runtime's threads
# (ThunkExecutor::Execute, 'Wait: pending_threads=3/8', which lead the list on a busy machine).
HLO_NAME = re.compile(r'[a-z][\w.$-]*')


def costliest_ops(trace: dict, steps: int, top: int = 10) -> list[dict]:
  """The `top` ops or fusions by device time per step in a jax.profiler perfetto trace of `steps`
  steps: a device's 'XLA Ops' line where the trace has one, else its kernels; on CPU the
  XLA thunks of the runtime's threads (compiled with xla_cpu_enable_xprof_traceme). Times are
  self times (a loop's or call's own, without the ops inside it); `share` is of all of them."""
  events = trace['traceEvents']
  processes = {e['pid']: e['args']['name'] for e in events if e.get('name') == 'process_name'}
  threads = {
    (e['pid'], e['tid']): e['args']['name'] for e in events if e.get('name') == 'thread_name'
  }
  spans = [
    (processes.get(e['pid'], ''), threads.get((e['pid'], e['tid']), ''), e)
    for e in events
    if e.get('ph') == 'X'
  ]
  device = [(thread, e) for process, thread, e in spans if process.startswith('/device:')]
  ops = (
    [e for thread, e in device if thread == 'XLA Ops']
    or [e for thread, e in device if not any(w in thread for w in SUMMARY_LINES)]
    or [
      e for _, thread, e in spans if thread.startswith('tf_XLA') and HLO_NAME.fullmatch(e['name'])
    ]
  )
  micros = collections.Counter()
  for name, us in self_times(ops):
    micros[name] += us
  total = sum(micros.values()) or 1
  return [
    {'op': name, 'seconds_per_step': round(us / 1e6 / steps, 6), 'share': round(us / total, 4)}
    for name, us in micros.most_common(top)
  ]


def self_times(spans: list[dict]) -> list[tuple[str, float]]:
  """(name, duration less the spans nested in it on the same thread) of every trace span."""
  own = {}
  by_thread = collections.defaultdict(list)
  for i, e in enumerate(spans):
    by_thread[e['pid'], e['tid']].append(i)
    own[i] = e.get('dur', 0)
  for indices in by_thread.values():
    open_spans = []  # the spans that contain the current one, innermost last
    for i in sorted(indices, key=lambda i: (spans[i]['ts'], -spans[i].get('dur', 0))):
      start = spans[i]['ts']
      while open_spans and start >= spans[open_spans[-1]]['ts'] + spans[open_spans[-1]]['dur']:
        open_spans.pop()
      if open_spans:
        own[open_spans[-1]] -= spans[i].get('dur', 0)
      open_spans.append(i)
  return [(spans[i]['name'], us) for i, us in own.items()]


def torch_spec(config, frames: int, num_tokens: int) -> dict:
  """What the PyTorch worker needs, as JSON: it imports neither JAX nor our package."""
  from agrepa_jax import selection

  lambdas = selection.lambdas_from_config(config)
  domains = tuple(config.data.domains)
  m = config.model
  return {
    'official': dict(
      num_layers=m.num_layers,
      width=m.width,
      num_heads=m.num_heads,
      n_mels=m.n_mels,
      token_dim=m.token_dim,
      vocab_size=m.vocab_size,
      teacher_dims=[config.teachers[d].dim for d in domains],
      mlp_ratio=m.mlp_ratio,
      dropout=m.dropout,
      max_len=frames,
    ),
    'batch_size': config.batch_size,
    'frames': frames,
    'num_tokens': num_tokens,
    'lambdas': {
      str(d): {str(int(layer)): float(lambdas[layer, d]) for layer in lambdas[:, d].nonzero()[0]}
      for d in range(len(domains))
    },
    'bitc_weights': [config.bitc.weights[d] for d in domains] if config.bitc.enabled else None,
    'flow': {k: config.flow[k] for k in ('noise_std', 'max_prompt_fraction', 'token_drop_prob')}
    | {'reference_drop_prob': config.flow.reference_drop_prob},
    'optim': {k: config.optim[k] for k in ('learning_rate', 'b1', 'b2', 'weight_decay')}
    | {'grad_clip': config.optim.grad_clip, 'pct_start': config.optim.pct_start},
  }


def torch_setup(spec):
  import torch

  from tests.reference import official

  baseline = rss_bytes()
  torch.manual_seed(0)
  cfg = official.OfficialConfig(
    **{**spec['official'], 'teacher_dims': tuple(spec['official']['teacher_dims'])}
  )
  model = official.FlowModel(cfg)
  b, frames = spec['batch_size'], spec['frames']
  batch = {
    'mel': torch.randn(b, cfg.n_mels, frames),
    'tokens': torch.randint(0, cfg.vocab_size, (b, spec['num_tokens'])),
    'domain': torch.arange(b) % len(cfg.teacher_dims),
    'teachers': [torch.randn(b, c) for c in cfg.teacher_dims],
  }
  lambdas = {
    int(d): {int(layer): w for layer, w in layers.items()} for d, layers in spec['lambdas'].items()
  }
  optim = spec['optim']
  optimizer, schedule = official.make_optimizer(
    model,
    optim['learning_rate'],
    optim['weight_decay'],
    (optim['b1'], optim['b2']),
    total_steps=100_000,
    pct_start=optim['pct_start'],
  )
  draws = official.FlowDraws(**spec['flow'])

  def step():
    return official.train_step(
      model,
      optimizer,
      schedule,
      batch,
      lambdas,
      spec['bitc_weights'],
      draws,
      optim['grad_clip'],
    )

  step()  # warm-up
  ready = {
    'torch_version': torch.__version__,
    'torch_baseline_rss_bytes': baseline,
    'torch_setup_peak_rss_bytes': rss_bytes('VmHWM'),
    'torch_params': sum(p.numel() for p in model.parameters()),
    'torch_glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
  }
  reset_peak_rss()
  ready['torch_rss_before_steps_bytes'] = rss_bytes()
  candidates = sorted({1, torch.get_num_threads()}, reverse=True)
  chosen = []

  def run_steps(n):
    """PyTorch's OpenMP threads slow down ≈ 10× when another process holds one of the cores
    they spin on, so each round first times one step with 1 and with all threads (untimed for
    the round) and runs with the faster."""
    trial = {}
    for threads in candidates:
      torch.set_num_threads(threads)
      start = time.perf_counter()
      step()
      trial[threads] = time.perf_counter() - start
    torch.set_num_threads(min(trial, key=trial.get))
    chosen.append(torch.get_num_threads())
    start = time.perf_counter()
    for _ in range(n):
      step()
    return time.perf_counter() - start

  def finish():
    return {
      'torch_peak_rss_bytes': rss_bytes('VmHWM'),
      'torch_final_rss_bytes': rss_bytes(),
      'torch_threads_per_round': chosen,
    }

  return ready, {'round': run_steps, 'finish': finish}


# ----- The driver -----
class Worker:
  def __init__(self, args: list[str], **environ: str):
    env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]),
      **environ,
    )
    self.process = subprocess.Popen(
      [sys.executable, __file__, *args],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
    )

  def read(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f'bench worker exited with {self.process.wait()}')
    return json.loads(line)

  def ask(self, command: str) -> dict:
    self.process.stdin.write(command + '\n')
    self.process.stdin.flush()
    return self.read()

  def close(self):
    self.process.stdin.close()
    self.process.wait()


def bench(name: str, args) -> dict:
  with tempfile.TemporaryDirectory(prefix='bench_compilation_cache_') as cache:
    return bench_with_cache(name, args, cache)


def bench_with_cache(name: str, args, cache: str) -> dict:
  """The timed JAX worker compiles into the empty persistent compilation cache `cache`; on CPU a
  second JAX worker then loads its executables from there and measures the step's memory once
  more."""
  from agrepa_jax import flops

  config = bench_config(name, args.forms, args.set)
  common = ['--configs', name, '--forms', args.forms, *[f'--set={s}' for s in args.set]]
  options = [*(['--no-fog-a'] if args.no_fog_a else []), *(['--profile'] if args.profile else [])]
  jax_args = ['--worker', 'jax', *common, *options]
  jax_environ = {'JAX_COMPILATION_CACHE_DIR': cache, **malloc_environ(args.huge_pages != 'none')}
  jax_worker = Worker(jax_args, **jax_environ)
  result = {'config': name, **jax_worker.read()}
  workers = {'jax': jax_worker}
  torch_reason = torch_missing(args, result['platform'])
  if torch_reason:
    print(f'bench: no PyTorch column: {torch_reason}', file=sys.stderr)
  else:
    spec = torch_spec(config, result['frames'], result['tokens_per_clip'])
    workers['torch'] = Worker(
      ['--worker', 'torch', '--spec', json.dumps(spec)],
      **malloc_environ(args.huge_pages == 'both'),
    )
    result.update(workers['torch'].read())

  seconds = {key: [] for key in workers}
  for r in range(args.rounds):
    for key in workers if r % 2 == 0 else reversed(workers):
      seconds[key].append(workers[key].ask(f'round {args.steps}')['seconds'] / args.steps)
  if args.profile:
    result['profile'] = jax_worker.ask(f'profile {args.steps}')['profile']
  for worker in workers.values():
    result.update(worker.ask('finish'))
    worker.close()
  if result['platform'] == 'cpu':
    result.update(cached_executable_memory(jax_args, jax_environ, args.steps))

  step_seconds = statistics.median(seconds['jax'])
  model = flops.model_config(config)
  per_device = result['flops_per_step_per_device']
  achieved = per_device / step_seconds
  chip = flops.chip(result['device'])
  matmul = max(result.pop('matmul_flops_per_second'), result.pop('matmul_flops_per_second_after'))
  every = config.repa.probe_every
  fog_a = result['fog_a_seconds']
  allocator = result.pop('allocator_peak_bytes')
  result.update(
    num_layers=model.num_layers,
    width=model.width,
    batch_size=config.batch_size,
    clip_seconds=config.data.clip_seconds,
    dtype=model.dtype,
    remat=model.remat,
    forms=args.forms,
    dropout_rng=model.dropout_rng,
    overrides=args.set,
    rounds=args.rounds,
    steps_per_round=args.steps,
    step_seconds=round(step_seconds, 4),
    step_seconds_per_round=[round(s, 4) for s in seconds['jax']],
    steps_per_second=round(1 / step_seconds, 3),
    clips_per_second=round(config.batch_size / step_seconds, 2),
    achieved_flops_per_second=achieved,
    mfu=None if chip is None else achieved / chip.peak_flops,
    matmul_flops_per_second=matmul,
    fraction_of_matmul=achieved / matmul if result['platform'] == 'cpu' else None,
    peak_memory_bytes=allocator or result['compiled_peak_bytes'],
    peak_memory_source='allocator' if allocator else 'compiled',
    fog_a_fraction=None if fog_a is None else fog_a / (every * step_seconds + fog_a),
    probe_every=every,
  )
  for framework in workers:
    result[f'{framework}_step_rss_bytes'] = (
      result[f'{framework}_peak_rss_bytes'] - result[f'{framework}_rss_before_steps_bytes']
    )
  if 'torch' in seconds:
    torch_seconds = statistics.median(seconds['torch'])
    result.update(
      torch_step_seconds=round(torch_seconds, 4),
      torch_step_seconds_per_round=[round(s, 4) for s in seconds['torch']],
      torch_over_jax=torch_seconds / step_seconds,
      torch_over_jax_fastest_rounds=min(seconds['torch']) / min(seconds['jax']),
      torch_over_jax_per_round=[t / j for t, j in zip(seconds['torch'], seconds['jax'])],
      jax_over_torch_peak_rss=result['jax_peak_rss_bytes'] / result['torch_peak_rss_bytes'],
      jax_over_torch_cached_peak_rss=(
        result['jax_cached_peak_rss_bytes'] / result['torch_peak_rss_bytes']
      ),
      jax_over_torch_step_rss=result['jax_step_rss_bytes'] / result['torch_step_rss_bytes'],
    )
  return result


def cached_executable_memory(jax_args: list[str], jax_environ: dict, steps: int) -> dict:
  """Resident memory of a JAX worker whose train step comes from the persistent compilation
  cache, as in a rerun or a resumed run (main.py's --compilation_cache): the step's compile adds
  no compiler heap to the process."""
  worker = Worker(jax_args, **jax_environ)
  ready = worker.read()
  worker.ask(f'round {steps}')
  memory = worker.ask('memory')
  worker.close()
  return {
    'jax_cached_compile_seconds': ready['compile_seconds'],
    'jax_cached_rss_before_steps_bytes': ready['jax_rss_before_steps_bytes'],
    'jax_cached_peak_rss_bytes': memory['peak_rss_bytes'],
  }


def malloc_environ(huge_pages: bool) -> dict:
  """A worker's GLIBC_TUNABLES: with huge-page malloc where the system has it, as main.py runs
  (agrepa_jax.host_memory), or as the caller's environment has it."""
  if not (huge_pages and host_memory.huge_pages_supported()):
    return {}
  environ = host_memory.huge_page_environ(os.environ)
  return {'GLIBC_TUNABLES': environ['GLIBC_TUNABLES']} if environ else {}


def torch_missing(args, platform: str) -> str:
  if args.no_torch:
    return '--no-torch'
  if platform != 'cpu':
    return f'the JAX step runs on {platform}; the PyTorch reference runs on CPU only'
  if importlib.util.find_spec('torch') is None:
    return 'torch is not installed (pip install torch==2.13.0, a test extra)'
  return ''


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=3, help='steps per timing round')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--configs', default='default,paper_width')
  parser.add_argument('--forms', default='official', choices=('official', 'config'))
  parser.add_argument('--set', action='append', default=[], help='config override KEY=VALUE')
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument(
    '--huge_pages',
    default='jax',
    choices=('jax', 'both', 'none'),
    help="huge-page malloc for the JAX worker as main.py runs it; 'both': for PyTorch's too",
  )
  parser.add_argument(
    '--profile', action='store_true', help='the ten costliest ops of --steps traced steps'
  )
  parser.add_argument('--no-fog-a', action='store_true', help='skip the online FoG-A timing')
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--spec', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker == 'jax':
    # tensorboardX (agrepa_jax.metrics) imports torch when it is installed: ≈ 220 MB of resident
    # memory that the JAX step does not use.
    sys.modules['torch'] = None
    config = bench_config(args.configs, args.forms, args.set)
    return serve(lambda: jax_setup(config, fog_a=not args.no_fog_a, profile=args.profile))
  if args.worker == 'torch':
    return serve(lambda: torch_setup(json.loads(args.spec)))
  for name in args.configs.split(','):
    print(json.dumps(bench(name, args)), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
