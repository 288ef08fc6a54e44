"""One module per `tip` command.

``rollout``, ``score``, ``select``, ``train``, ``evaluate``, ``report``, ``distill`` (with
its held-out evaluation ``heldout``), ``demo`` and ``student``: each opens with a runnable
example and exposes one ``run_*`` function that the CLI calls with a config object. Only
stages write stage directories."""
