"""EleutherAI's lm-evaluation-harness, a client no one here wrote, scoring a multiple-choice task through
`chatforge serve`: its `local-completions` model asks /v1/completions for echoed prompt logprobs, and the
per-choice loglikelihoods it reports must equal chatforge's own scoring of the same texts.

Offline: the task is a YAML file over a JSON file this test writes (read by `datasets`' packaged json
builder), and lm-eval's tokenizer (it needs one to find where each continuation starts) is the demo
model's tokenizer.json in a local folder, loaded by transformers without the Hub.
"""
from __future__ import annotations

import json

import pytest
import torch

from chatforge.engine import Engine
from chatforge.loader import DEMO_MODEL, load
from chatforge.server.process import ServerProcess

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev extra: pip install -e '.[dev]'")
pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra: pip install 'lm-eval[api]'")

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [
    {"question": "Once upon a", "choices": ["time", "table", "banana"], "answer": 0},
    {"question": "Hello, how are", "choices": ["you?", "they doing?"], "answer": 0},
    {"question": "The cat sat on the", "choices": ["mat.", "moon.", "idea of a chair."], "answer": 0},
]
TASK = """task: chatforge_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def own_score(engine: Engine, context: str, continuation: str) -> float:
    """log P(continuation | context) from the model directly: the continuation's tokens are those of
    context + continuation after the context's tokens (how lm-eval splits a pair), scored by one plain
    forward pass."""
    tok = engine.tokenizer
    whole, head = tok.encode(context + continuation), tok.encode(context)
    with torch.inference_mode():
        logprobs = engine.model(torch.tensor([whole]))[0].float().log_softmax(-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(head), len(whole)))


def test_lm_eval_multiple_choice_matches_chatforges_own_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "chatforge_mc.yaml").write_text(TASK.format(data=data, cache=tmp_path / "hf-datasets"))
    model, tokenizer = load(DEMO_MODEL, device="cpu")
    tokenizer.save(tmp_path / "tokenizer")  # tokenizer.json + tokenizer_config.json: what transformers reads
    engine = Engine(model, tokenizer)

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with ServerProcess("--db", str(tmp_path / "chats.db"), "--threads", "1", "--log-level", "warning") as server:
        results = simple_evaluate(
            model="local-completions",
            model_args={"base_url": server.url + "/v1/completions", "model": DEMO_MODEL,
                        "tokenizer_backend": "huggingface", "tokenizer": str(tmp_path / "tokenizer"),
                        "tokenized_requests": True, "max_retries": 1},
            tasks=["chatforge_mc"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
            log_samples=True, bootstrap_iters=0)

    assert results["results"]["chatforge_mc"]["sample_len"] == len(DOCS)
    samples = sorted(results["samples"]["chatforge_mc"], key=lambda s: s["doc_id"])
    assert [len(s["resps"]) for s in samples] == [len(d["choices"]) for d in DOCS]
    for sample in samples:
        for (context, continuation), [(loglikelihood, _)] in zip(sample["arguments"], sample["resps"]):
            assert loglikelihood == pytest.approx(own_score(engine, context, continuation), abs=1e-3)
    # accuracy is lm-eval's own arithmetic over those scores: the most likely choice against the answer
    picked = [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]
    assert results["results"]["chatforge_mc"]["acc,none"] == pytest.approx(
        sum(p == d["answer"] for p, d in zip(picked, DOCS)) / len(DOCS))
