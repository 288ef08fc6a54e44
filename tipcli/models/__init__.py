"""Models and what they read: loading, prompts, the teacher and the student.

Loading checkpoints, tokenizers and GGUF files (``loading``), prompts and chat templates
(``prompts``), the teacher as one interface whatever its home (``teacher``), the student as
what is trained, saved and sampled (``student``), and the tiny models of the tests and the
demo builder (``tiny``)."""
