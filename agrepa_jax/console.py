"""What the terminal shows: progress bars, a start summary, evaluations and warnings.

Every log record also goes to `DIR/logs/process_<i>.log` (a local directory when DIR is in an
object store, log_directory); library INFO lines (orbax, absl, jax) reach the terminal only with
`--verbose`.
"""

import logging
import os
import pathlib
import re
import sys
import tempfile

import jax
import tqdm

PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent)
FORMAT = '%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s'


class RunError(RuntimeError):
  """A failure the command line reports as its message alone (the traceback goes to the log file),
  with its own exit status."""

  exit_code = 1


class UsageError(RunError):
  """A config value, config file or path the command cannot use."""

  exit_code = 2


class Preempted(BaseException):
  """SIGTERM stopped the run with everything it trained saved: the same command resumes it.

  A BaseException, as KeyboardInterrupt: raised from a signal handler during start-up, it must not
  be caught by a library's `except Exception`.
  """

  exit_code = 6


FILE_ONLY = 'file_only'  # a log record with this attribute set skips the terminal


class _TqdmHandler(logging.StreamHandler):
  """Writes through tqdm, so log lines do not break a progress bar."""

  def emit(self, record):
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # noqa: BLE001 - logging must never raise
      self.handleError(record)


def _terminal_filter(verbose: bool):
  def keep(record: logging.LogRecord) -> bool:
    if getattr(record, FILE_ONLY, False):
      return False
    if record.levelno >= logging.WARNING:
      return True
    if not (verbose or record.pathname.startswith(PACKAGE_DIR)):
      return False
    return jax.process_index() == 0

  return keep


def log_directory(workdir) -> pathlib.Path:
  """DIR/logs for a local workdir; for one in an object store (no append there), a local
  directory named after it under the system's temporary directory."""
  text = os.fspath(workdir)
  if '://' not in text:
    return pathlib.Path(text, 'logs')
  return pathlib.Path(tempfile.gettempdir(), 'agrepa_jax_logs', re.sub(r'[^\w.-]+', '_', text))


def configure_logging(workdir, verbose: bool = False) -> pathlib.Path:
  """Routes every record to the run's log file (log_directory) and this package's INFO to the
  terminal."""
  root = logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  root.setLevel(logging.INFO)
  terminal = _TqdmHandler()
  terminal.setFormatter(logging.Formatter('%(levelname).1s %(message)s'))
  terminal.addFilter(_terminal_filter(verbose))
  root.addHandler(terminal)
  # Installed before the first jax call, whose backend start-up messages would otherwise print.
  log_path = log_directory(workdir) / f'process_{jax.process_index()}.log'
  log_path.parent.mkdir(parents=True, exist_ok=True)
  to_file = logging.FileHandler(log_path)
  to_file.setFormatter(logging.Formatter(FORMAT))
  root.addHandler(to_file)
  return log_path


def report_error(error: BaseException):
  """`error: <message>` on the terminal; the message with its traceback in the log file."""
  logging.error('%s', error, exc_info=error, extra={FILE_ONLY: True})
  tqdm.tqdm.write(f'error: {error}', file=sys.stderr)


def log_start_summary(config, meta: dict, mesh, shapes):
  """One block at the start of training: data, model size, mesh and schedule."""
  from agrepa_jax.state import param_counts

  counts = param_counts(shapes)
  logging.info(
    'data: %s clips in %s', meta.get('num_clips'), meta.get('directory', config.data.source)
  )
  logging.info(
    'model: %d blocks × width %d, %.2f M parameters (backbone %.2f M, REPA heads %.2f M, '
    'BiT-C heads %.2f M)',
    config.model.num_layers,
    config.model.width,
    sum(counts[k] for k in ('backbone', 'repa_heads', 'bitc_heads')) / 1e6,
    counts['backbone'] / 1e6,
    counts['repa_heads'] / 1e6,
    counts['bitc_heads'] / 1e6,
  )
  logging.info(
    'mesh %s over %d devices (%s, %d processes); batch %d; %d steps',
    dict(mesh.shape),
    mesh.devices.size,
    jax.devices()[0].platform,
    jax.process_count(),
    config.batch_size,
    config.num_steps,
  )


def log_evaluation(step: int, scalars: dict):
  held_out = ', '.join(f'{k} {v:.4f}' for k, v in sorted(scalars.items()) if k.startswith('eval_'))
  logging.info('step %d: %s', step, held_out)
