"""Built-in tasks that need no download, and the builder of the demo's pair.

Prompts with answers in a verifier-friendly response format (``arithmetic``, the demo's
task: multi-digit addition with a worked scratchpad), and the builder of the demo's teacher
and student (``build``).
"""
