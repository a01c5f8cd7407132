"""Evaluation of HRM-Text checkpoints with lm-evaluation-harness.

  HRMLM                 the harness adapter, registered as model "hrm" (evaluation.lm)
  write_local_tasks     task YAMLs over local benchmark files (evaluation.tasks)
  run, main             evaluate, with full and clean-subset scores (evaluation.run)
"""

from evaluation.run import main, run, table

__all__ = ["main", "run", "table"]
