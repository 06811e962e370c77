"""Command line: python -m agrepa_jax.main --config configs/X.py --workdir DIR [--mode MODE] [--config.K=V]."""

import logging
import pathlib

import jax
from absl import app, flags
from ml_collections import config_flags

from agrepa_jax import aot, train

MODES = ('train', 'aot', 'features', 'probe', 'sample', 'eval')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_string(
  'workdir', None, 'Directory for everything the run writes; re-running resumes it.'
)
flags.DEFINE_enum(
  'mode',
  'train',
  MODES,
  'train: train or resume; aot: compile the train step only; features: build (or resume '
  'building) the data cache with teacher features and tokens; probe: FoG-A, LASP, SCD and '
  'layer selection of a trained workdir into DIR/probe; '
  'sample: generate held-out clips into DIR/samples; eval: FAD, WER and mel L1 into DIR/eval.json.',
)
flags.DEFINE_bool(
  'distributed',
  False,
  'Call jax.distributed.initialize() first (multi-host jobs; '
  'coordinator from the environment: TPU pods, SLURM, or JAX_COORDINATOR_ADDRESS).',
)
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if FLAGS.distributed:
    jax.distributed.initialize()
  config, workdir = FLAGS.config, pathlib.Path(FLAGS.workdir).expanduser().absolute()
  if FLAGS.mode == 'train' and config.workflow == 'compare':
    from agrepa_jax import compare

    train.write_config(config, workdir)
    compare.run_compare(config, workdir)
  elif FLAGS.mode == 'train':
    train.write_config(config, workdir)
    train.train_and_evaluate(config, workdir)
  elif FLAGS.mode == 'aot':
    logging.info('aot: %s', aot.run(config, workdir))
  elif FLAGS.mode == 'features':
    from agrepa_jax.data import prepare

    logging.info('features: %s', prepare.write_features_report(config, workdir))
  elif FLAGS.mode == 'probe':
    from agrepa_jax.probe import report

    report.run_probe(config, workdir)
  elif FLAGS.mode == 'sample':
    from agrepa_jax.generation import evaluate

    evaluate.run_sample(config, workdir)
  elif FLAGS.mode == 'eval':
    from agrepa_jax.generation import evaluate

    logging.info('eval: %s', evaluate.run_eval(config, workdir))


if __name__ == '__main__':
  app.run(main)
