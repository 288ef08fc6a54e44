"""The trainer behind `tip train` and `tip distill` (the stage is ``tipcli.stages.train``).

What a run reads and the batches of a step (``data``), the student with its chunked loss as
one module (``module``), optimizer steps (``loop``) and resumable state (``checkpoint``)."""
