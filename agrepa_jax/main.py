"""Command line: python -m agrepa_jax.main --config configs/X.py --workdir DIR [--mode MODE]
[--config.KEY=VALUE ...]. Modes are listed in MODES; each runs one function of the package.

A bad flag, config file, config value or workdir ends the command before it writes anything, with
exit status 2 and one `error:` line; a run's own failures (console.RunError) print their message
and keep the traceback in the log file.
"""

import importlib
import logging
import os
import sys
import traceback

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from agrepa_jax import config_base, console, files, host_memory
from agrepa_jax import workdir as workdir_lib

# mode -> (module, function(config, workdir)), imported only when the mode runs
MODES = {
  'train': ('agrepa_jax.train', 'train_and_evaluate'),
  'compare': ('agrepa_jax.compare', 'run_compare'),
  'aot': ('agrepa_jax.aot', 'run'),
  'features': ('agrepa_jax.data.prepare', 'write_features_report'),
  'probe': ('agrepa_jax.probe.report', 'run_probe'),
  'sample': ('agrepa_jax.generation.evaluate', 'run_sample'),
  'eval': ('agrepa_jax.generation.evaluate', 'run_eval'),
}
TRAINING_MODES = ('train', 'compare')  # they hold the workdir and check its config record
# Unlocked, so that an override of a key that does not exist reaches config_checks, which names it.
config_flags.DEFINE_config_file(
  'config', None, 'Config file (configs/*.py).', lock_config=False, accept_new_attributes=True
)
flags.DEFINE_string(
  'workdir', None, 'Directory for everything the run writes; re-running resumes it.'
)
flags.DEFINE_enum(
  'mode',
  'train',
  [m for m in MODES if m != 'compare'],
  'train: train or resume (the compare workflow with configs/compare.py); aot: compile the train '
  'step only; features: build (or resume building) the data cache; probe: FoG-A, LASP, SCD and '
  'layer selection into DIR/probe; sample: held-out clips into DIR/samples; eval: FAD, WER and '
  'mel L1 into DIR/eval.json.',
)
flags.DEFINE_bool(
  'distributed',
  False,
  'Call jax.distributed.initialize() first (multi-host jobs; coordinator from the environment: '
  'TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS).',
)
flags.DEFINE_bool(
  'verbose', False, 'Also print library INFO lines (orbax, absl, jax); they always go to DIR/logs/.'
)
flags.DEFINE_bool(
  'allow_config_change',
  False,
  'train: resume although settings that shape the parameters or the data (model, teachers, data) '
  'differ from the ones stored with the checkpoints; the change is logged in '
  'DIR/config_history.jsonl.',
)
flags.DEFINE_string(
  'compilation_cache',
  '~/.cache/agrepa_jax/jax_compilation_cache',
  "JAX's persistent compilation cache (local or gs://): a rerun, a resumed run and the compare "
  "workflow's runs load compiled steps instead of compiling them again; '' turns it off. On "
  'multi-host jobs give a directory every host shares (gs://...), so that all hosts find the '
  'same compiled steps and reach their first collective together.',
)
flags.DEFINE_integer(
  'task',
  None,
  'features: build slice TASK (0-based) of --num_tasks and stop: one task of a batch-job array '
  '(SLURM, TPU-VM workers); no jax.distributed, no accelerator needed but for teachers. The task '
  'that finds every shard built writes the index; a last --mode features without --task checks.',
)
flags.DEFINE_integer('num_tasks', 1, 'features: the number of tasks --task is one of.')
flags.DEFINE_bool(
  'refit_tokenizer',
  False,
  'features: fit the built-in tokenizer again (every shard is then computed again); otherwise the '
  'fitted tokenizer is kept whatever clips are added.',
)
flags.DEFINE_string(
  'topology',
  '',
  "aot: compile for this TPU topology with libtpu's compiler on this host (e.g. v5p:4x4x4, "
  "v5e:8x8, v6e:4x4; pip install -e '.[tpu]') instead of for the local devices.",
)
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


LIBRARY_DIRECTORIES = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})


def describe_flag_error(error: BaseException) -> str:
  """One line for a failed flag parse or config load: where the config file failed (its file and
  line) and why, or absl's own message for a bad flag."""
  cause = error
  while cause.__cause__ or cause.__context__:
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, SyntaxError):
    return f'--config {cause.filename}, line {cause.lineno}: {cause.msg}'
  config_frames = [
    frame
    for frame in traceback.extract_tb(cause.__traceback__)
    if not frame.filename.startswith((*LIBRARY_DIRECTORIES, '<', __file__))
  ]
  if config_frames:
    where = config_frames[-1]
    return f'--config {where.filename}, line {where.lineno}: {type(cause).__name__}: {cause}'
  if isinstance(cause, KeyError):  # an override below a section the config does not have
    key = str(cause.args[0]).splitlines()[0].strip('\'"')
    names = [a.split('=')[0] for a in sys.argv if a.startswith('--config.')]
    flag = [n for n in names if key in n.split('.')] or ['--config']
    return f'{flag[0]}: no such key {key!r}'
  return str(error).strip().splitlines()[0]


def exit_for_usage(message: str):
  sys.stderr.write(f'error: {message}\n')
  sys.exit(console.UsageError.exit_code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with any failure (a config file that does not run, a bad flag value)
  reported by exit_for_usage."""
  try:
    return FLAGS(argv)
  except Exception as error:  # the config file is user code: anything it raises is bad input
    exit_for_usage(describe_flag_error(error))


def loaded_config() -> tuple[ml_collections.ConfigDict, dict]:
  """(--config with its fidelity applied, checked (config_checks) and locked; {key: (old, new)}
  that fidelity='official' set). UsageError for a missing or failing file (which config_flags
  only reports when the config is first used)."""
  config = FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):
    path = FLAGS['config'].config_filename.split(':')[0]
    if not os.path.isfile(path):
      raise console.UsageError(f'--config {path}: no such file')
    try:
      config.lock()
    except OSError as error:
      raise console.UsageError(describe_flag_error(error)) from error
  from agrepa_jax import config_checks  # here, after the huge-page re-exec: it imports the model

  if config.get('fidelity') not in config_base.FIDELITIES:
    raise console.UsageError(
      f'fidelity={config.get("fidelity")!r}: expected one of {config_base.FIDELITIES}'
    )
  config, fidelity_changes = config_base.resolve_fidelity(config)
  config_checks.check(config)
  config.lock()
  return config, fidelity_changes


def main(argv):
  del argv
  try:
    (config, fidelity_changes), workdir = loaded_config(), files.as_path(FLAGS.workdir)
    workdir_lib.check_workdir(workdir)
    if FLAGS.task is not None and not 0 <= FLAGS.task < FLAGS.num_tasks:
      raise console.UsageError(
        f'--task={FLAGS.task}: expected 0 to {FLAGS.num_tasks - 1} (--num_tasks={FLAGS.num_tasks})'
      )
  except console.UsageError as error:
    exit_for_usage(str(error))
  if FLAGS.distributed:
    jax.distributed.initialize()
  if FLAGS.compilation_cache:
    jax.config.update(
      'jax_compilation_cache_dir', os.fspath(files.as_path(FLAGS.compilation_cache))
    )
  log_path = console.configure_logging(workdir, FLAGS.verbose)
  for key, (old, new) in fidelity_changes.items():
    logging.info('fidelity=%r sets %s: %r -> %r', config.fidelity, key, old, new)
  mode = 'compare' if FLAGS.mode == 'train' and config.workflow == 'compare' else FLAGS.mode
  logging.info('%s: %s (all log lines: %s)', mode, workdir, log_path)
  module, function = MODES[mode]
  options = {'allow_config_change': FLAGS.allow_config_change} if mode in TRAINING_MODES else {}
  if mode == 'features':
    options = {
      'task': FLAGS.task,
      'num_tasks': FLAGS.num_tasks,
      'refit_tokenizer': FLAGS.refit_tokenizer,
    }
  if mode == 'aot':
    options = {'topology': FLAGS.topology}
  try:
    result = getattr(importlib.import_module(module), function)(config, workdir, **options)
  except console.RunError as error:
    console.report_error(error)
    sys.exit(error.exit_code)
  except console.Preempted as stop:
    logging.warning('%s', stop)
    sys.exit(stop.exit_code)
  if mode in ('aot', 'features', 'eval'):
    logging.info('%s: %s', mode, result)


if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()
  app.run(main, flags_parser=parse_flags)
