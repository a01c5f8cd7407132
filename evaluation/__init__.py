"""Evaluation of HRM-Text checkpoints with lm-evaluation-harness.

  HRMLM                 the harness adapter, registered as model "hrm" (evaluation.lm)
  write_local_tasks     task YAMLs over local benchmark files (evaluation.tasks)
  run, main             evaluate, with full and clean-subset scores (evaluation.run)
  locate                a run's checkpoint, tokenizer check, contamination; the run manifest record
                        (evaluation.locate)
"""

from evaluation.run import main, run, table

__all__ = ["main", "run", "table"]
