"""The maths, free of files and processes: tensors in, tensors out.

Model inputs and the LM head apart (``forward``), exact per-token statistics (``stats``),
normalisation, Soft-OR, quadrants and masks (``selection``), the distillation losses
(``losses``) and answer graders (``verify``). Each chunked computation has a plain
reference in tests/reference.py."""
