"""Engines tip drives but does not implement: samplers and a served teacher.

The ``Sampler`` protocol and ``make_sampler`` (``sampler``), transformers' ``generate``
(``hf``), vLLM (``vllm_engine``), what samplers share (``common``), and a teacher on its
own vLLM server (``served``)."""
