"""The training verbs end to end through the real `chatforge` command: pretrain (causal and
masked LM), finetune (chat and classify), eval and export, plus the mistakes a user can make."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

from chatforge import load
from chatforge.formats.checkpoint import read_checkpoint as load_checkpoint

TRAIN = ["--max-steps", "6", "--batch-size", "4", "--warmup-steps", "1", "--eval-interval", "3", "--eval-iters", "1",
         "--log-interval", "3", "--no-progress", "--precision", "fp32", "--device", "cpu"]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
PROSE = "".join(f"The cat {i} sat on the mat. It was warm there. Then it slept.\n\n" for i in range(80))


def ok(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "prose.txt"
    path.write_text(PROSE)
    return path


def test_pretrain_causal_then_eval_perplexity(tmp_path, prose):
    out = ok(run_cli("pretrain", "--data", str(prose), "--preset", "test", *TINY, *TRAIN, "--out-dir", str(tmp_path)))
    assert "done: step 6" in out
    model, _ = load_checkpoint(tmp_path / "last")
    assert model.config.causal and model.config.n_embd == 32  # flags override the preset
    report = json.loads(ok(run_cli("eval", "--model", str(tmp_path / "best"), "--data", str(prose), "--json")))
    assert report["task"] == "perplexity" and report["perplexity"] > 1 and report["tokens"] > 1000


def test_eval_prices_quantization_on_the_demo_model(tmp_path):
    """`eval --quantize` scores the quantized model: on the trained demo model int8 barely moves the
    perplexity, int4 moves it more but stays close; an encoder is refused in one line."""
    text = tmp_path / "chat.txt"
    text.write_text(" ".join(f"Hello, how are you today? I am fine, thank you. Let us talk about {topic}."
                             for topic in ("music", "the sea", "books", "cooking", "the weather", "friends")))
    ppl = {}
    for mode in (None, "int8", "int4"):
        args = ["eval", "--model", "chatforge-demo", "--data", str(text), "--json"] + (["--quantize", mode] if mode else [])
        ppl[mode] = json.loads(ok(run_cli(*args)))["perplexity"]
    assert ppl["int4"] != ppl[None]  # the quantized model was scored, not the full-precision one
    assert abs(ppl["int8"] / ppl[None] - 1) < 0.03 and abs(ppl["int4"] / ppl[None] - 1) < 0.10, ppl


@pytest.mark.parametrize("objective", ["mlm", "mlm+nsp"])
def test_pretrain_encoder_objectives(tmp_path, prose, objective):
    out = ok(run_cli("pretrain", "--objective", objective, "--data", str(prose), *TINY,
                     "--vocab-size", "300", "--whole-word-mask", "--sentences", "prose", *TRAIN,
                     "--out-dir", str(tmp_path)))
    assert "mlm accuracy" in out and ("nsp accuracy" in out) == (objective == "mlm+nsp")
    model, tok = load_checkpoint(tmp_path / "last")
    assert not model.config.causal and tok.token_id("mask") is not None
    report = json.loads(ok(run_cli("eval", "--model", str(tmp_path / "last"), "--data", str(prose),
                                   "--sentences", "prose", "--json")))
    assert report["task"] == "masked-lm" and 0 <= report["mlm_accuracy"] <= 1
    assert ("nsp_accuracy" in report) == (objective == "mlm+nsp")
    refused = run_cli("eval", "--model", str(tmp_path / "last"), "--data", str(prose), "--quantize", "int8")
    assert refused.returncode == 2 and "--quantize is for causal language models" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_finetune_chat_from_a_checkpoint(tmp_path, chat_model_dir):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Hi {i}"},
                                                     {"role": "assistant", "content": "Hello there!"}]}) + "\n"
                            for i in range(30)))
    out = ok(run_cli("finetune", "--task", "chat", "--model", str(chat_model_dir), "--data", str(data),
                     *TRAIN, "--out-dir", str(tmp_path / "run")))
    assert f"chatforge chat --model {tmp_path / 'run' / 'best'}" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and any("val_loss" in r for r in rows)
    lora = ok(run_cli("finetune", "--model", str(chat_model_dir), "--data", str(data), "--lora-rank", "4",
                      *TRAIN, "--out-dir", str(tmp_path / "lora")))
    assert "merged" in lora and (tmp_path / "lora" / "merged" / "model.safetensors").is_file()


def test_finetune_classify_then_eval(tmp_path):
    rows = [("good", "xyz fine film") if i % 2 else ("bad", "qvw poor film") for i in range(60)]
    table = tmp_path / "reviews.tsv"
    table.write_text("label\ttext\n" + "".join(f"{y}\t{x}\n" for y, x in rows))
    base = tmp_path / "base"
    ok(run_cli("pretrain", "--data", str(table), "--preset", "test", *TINY, *TRAIN, "--out-dir", str(base)))
    out = ok(run_cli("finetune", "--task", "classify", "--model", str(base / "best"), "--data", str(table),
                     "--metric", "macro_f1", *TRAIN, "--out-dir", str(tmp_path / "clf")))
    assert "[val]" in out and "[test]" in out and "confusion matrix" in out
    report = json.loads(ok(run_cli("eval", "--model", str(tmp_path / "clf" / "best"), "--data", str(table),
                                   "--json")))
    assert report["examples"] == 60 and sorted(report["labels"]) == ["bad", "good"]
    assert sum(map(sum, report["confusion_matrix"])) == 60


def test_export_hf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    ok(run_cli("export", str(tmp_path / "hf"), "--format", "hf"))  # the built-in demo model
    ours, tok = load()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tok.encode("Hello, how are you?")])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.chat_template == tok.chat_template
    # the other direction: a Hugging Face directory back into a chatforge checkpoint
    ok(run_cli("export", str(tmp_path / "back"), "--model", str(tmp_path / "hf"), "--format", "chatforge"))
    again, _ = load_checkpoint(tmp_path / "back")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_training_verbs_refuse_bad_input_on_one_line(tmp_path, prose, chat_model_dir):
    one_line_error(run_cli("pretrain", "--preset", "test"), "no training data")
    one_line_error(run_cli("pretrain", "--data", str(prose), "--preset", "huge"), "unknown preset", "nano")
    one_line_error(run_cli("finetune", "--task", "classify", "--model", "chatforge-demo", "--data",
                           str(tmp_path / "missing.tsv"), "--out-dir", str(tmp_path / "x")), "missing.tsv")
    one_line_error(run_cli("eval", "--model", str(tmp_path / "nowhere"), "--data", str(prose)), "nowhere")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("keep me")
    one_line_error(run_cli("export", str(tmp_path / "full")), "not empty")
    one_line_error(run_cli("export", str(tmp_path / "e"), "--model", str(chat_model_dir)), "layernorm", "rmsnorm")
    assert (tmp_path / "full" / "file").read_text() == "keep me"


@pytest.mark.parametrize("case, fragments", [
    ("empty_data", ("empty.txt",)),
    ("heads", ("n_head (4) must divide n_embd (30)",)),
    ("zero_layers", ("n_layer",)),
    ("truncated_checkpoint", ("corrupt or truncated",)),
    ("foreign_tokenizer", ("do not belong together",)),
    ("prompt_too_long", ("context",)),
    ("bad_min_p", ("min_p must be in [0, 1]",)),  # generate passes every sampling flag through
])
def test_foundation_mistakes_end_in_one_line(tmp_path, chat_model_dir, case, fragments):
    import shutil

    from chatforge.tokenizer import Tokenizer

    (tmp_path / "empty.txt").write_text("")
    model = tmp_path / "model"
    shutil.copytree(chat_model_dir, model)
    args = {
        "empty_data": ["pretrain", "--data", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path / "r")],
        "heads": ["pretrain", "--data", str(tmp_path / "empty.txt"), "--n-embd", "30", "--n-head", "4"],
        "zero_layers": ["pretrain", "--data", str(tmp_path / "empty.txt"), "--n-layer", "0"],
        "truncated_checkpoint": ["generate", "--model", str(model), "--prompt", "Hi"],
        "foreign_tokenizer": ["generate", "--model", str(model), "--prompt", "Hi"],
        "prompt_too_long": ["generate", "--model", str(model), "--prompt", "Hello " * 100],
        "bad_min_p": ["generate", "--model", str(model), "--prompt", "Hi", "--min-p", "3"],
    }[case]
    if case == "truncated_checkpoint":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    if case == "foreign_tokenizer":
        Tokenizer.train_char(["only a few letters"]).save(model)
    one_line_error(run_cli(*args), *fragments)
