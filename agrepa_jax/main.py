"""Command line: python -m agrepa_jax.main --config configs/X.py --workdir DIR [--mode MODE]
[--config.KEY=VALUE ...]. Modes are listed in MODES; each runs one function of the package."""

import importlib
import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from agrepa_jax import config_base, console, files, host_memory

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
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
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
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.distributed:
    jax.distributed.initialize()
  if FLAGS.compilation_cache:
    jax.config.update(
      'jax_compilation_cache_dir', os.fspath(files.as_path(FLAGS.compilation_cache))
    )
  config, fidelity_changes = config_base.resolve_fidelity(FLAGS.config)
  workdir = files.as_path(FLAGS.workdir)
  log_path = console.configure_logging(workdir, FLAGS.verbose)
  for key, (old, new) in fidelity_changes.items():
    logging.info('fidelity=%r sets %s: %r -> %r', config.fidelity, key, old, new)
  mode = 'compare' if FLAGS.mode == 'train' and config.workflow == 'compare' else FLAGS.mode
  logging.info('%s: %s (all log lines: %s)', mode, workdir, log_path)
  module, function = MODES[mode]
  options = {'allow_config_change': FLAGS.allow_config_change} if mode in TRAINING_MODES else {}
  try:
    result = getattr(importlib.import_module(module), function)(config, workdir, **options)
  except console.RunError as e:
    logging.error('%s', e)
    sys.exit(e.exit_code)
  if mode in ('aot', 'features', 'eval'):
    logging.info('%s: %s', mode, result)


if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()
  app.run(main)
