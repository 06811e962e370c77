"""Runs the main job as several JAX processes on this machine, with a local coordinator.

  python launch/local_multiprocess.py --processes 2 --devices_per_process 4 -- \
    --config configs/default.py --workdir workdir/mp [--config.KEY=VALUE ...]

Every process calls jax.distributed.initialize(coordinator_address='localhost:PORT',
num_processes, process_id), then runs `agrepa_jax.main` with the arguments after `--`. On CPU
each process gets `devices_per_process` host devices; on GPU, process i drives GPUs
[i·k, (i+1)·k) of this machine. It rehearses a multi-host job on one machine
(tests/test_multihost.py). If a process fails, the others are stopped.
Process i's output goes to LOG_DIR/process_i.log with --log_dir, else to this terminal.
"""

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import time

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def worker(args, main_args):
  """One process: initialize the distributed runtime, then the ordinary command line."""
  sys.path.insert(0, str(REPOSITORY))  # this checkout's package, wherever it is installed from
  from agrepa_jax import host_memory

  host_memory.reexec_with_huge_pages()  # as main.py's command line does
  if args.platform == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + f' --xla_force_host_platform_device_count={args.devices_per_process}'
    ).strip()
  import jax

  first = args.process_id * args.devices_per_process
  jax.distributed.initialize(
    coordinator_address=f'localhost:{args.port}',
    num_processes=args.processes,
    process_id=args.process_id,
    local_device_ids=None
    if args.platform == 'cpu'
    else list(range(first, first + args.devices_per_process)),
  )
  from absl import app

  from agrepa_jax import main

  app.run(main.main, argv=['agrepa_jax.main', *main_args])


def launch(args, main_args) -> int:
  """Starts every process, waits for all; returns the first non-zero exit status (else 0)."""
  port = args.port or free_port()
  processes = []
  for i in range(args.processes):
    command = [sys.executable, __file__, f'--process_id={i}', f'--port={port}']
    command += [
      f'--{k}={getattr(args, k)}' for k in ('processes', 'devices_per_process', 'platform')
    ]
    output = None
    if args.log_dir:
      pathlib.Path(args.log_dir).mkdir(parents=True, exist_ok=True)
      output = open(pathlib.Path(args.log_dir) / f'process_{i}.log', 'w')  # noqa: SIM115
    processes.append(
      subprocess.Popen([*command, '--', *main_args], stdout=output, stderr=subprocess.STDOUT)
    )
  status = 0
  while any(p.poll() is None for p in processes):
    failed = [p.returncode for p in processes if p.returncode not in (None, 0)]
    if failed:  # one process died: the others would wait for it at the next collective
      status = failed[0]
      for p in processes:
        if p.poll() is None:
          p.terminate()
    time.sleep(0.2)
  return status or next((p.returncode for p in processes if p.returncode), 0)


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4)
  parser.add_argument('--platform', choices=('cpu', 'gpu'), default='cpu')
  parser.add_argument('--port', type=int, default=0, help='coordinator port; 0 = a free one')
  parser.add_argument('--log_dir', default='', help='one log file per process; default: terminal')
  parser.add_argument('--process_id', type=int, default=-1, help=argparse.SUPPRESS)
  if '--' not in argv:
    parser.error('give the agrepa_jax.main arguments after --')
  split = argv.index('--')
  return parser.parse_args(argv[:split]), argv[split + 1 :]


if __name__ == '__main__':
  launcher_args, main_args = parse(sys.argv[1:])
  if launcher_args.process_id >= 0:
    worker(launcher_args, main_args)
  else:
    sys.exit(launch(launcher_args, main_args))
