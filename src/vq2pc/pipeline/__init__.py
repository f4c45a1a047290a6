"""The whole job, as stages in a run directory: data → VQ-VAE → prior → circuits → experiments → report.

A stage whose outputs exist is skipped on a re-run (``force`` names stages to
redo); an interrupted training resumes from its last epoch checkpoint.

Stage 7 of the flow (with the run configuration, :mod:`~vq2pc.pipeline.config`).
May import: every stage up to :mod:`vq2pc.evaluate`.
"""

from vq2pc.pipeline.orchestrate import run_pipeline
from vq2pc.pipeline.rundir import STAGES, RunDir

__all__ = ["run_pipeline", "STAGES", "RunDir"]
