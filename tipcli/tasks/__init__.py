"""Built-in tasks that need no download: prompts with answers, a verifier-friendly
response format, and a teacher/student pair trained here.

    python -m tipcli.tasks.arithmetic build
    python -m tipcli.tasks.arithmetic prompts -n 200 -o arith.jsonl

``arithmetic``: multi-digit addition with a worked scratchpad (the demo's task).
"""
