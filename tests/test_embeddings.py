"""Sentence embeddings: pipeline("feature-extraction") and pipeline("sentence-embedding") against transformers
and sentence-transformers (tiny random BERTs offline; the real all-MiniLM-L6-v2 where a package index can be
reached), `chatforge embed` through the real CLI, and POST /v1/embeddings of a real `chatforge serve`
through the official openai client."""
from __future__ import annotations

import base64
import json
import shutil

import httpx
import numpy as np
import openai
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from chatforge import pipeline  # noqa: E402
from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.formats.hf.read import read_hf_tokenizer  # noqa: E402
from chatforge.loader import load  # noqa: E402
from chatforge.pipelines.embeddings import TextTooLong  # noqa: E402
from chatforge.server.embeddings_api import MAX_INPUTS  # noqa: E402
from chatforge.server.process import ServerProcess  # noqa: E402
from conftest import run_cli  # noqa: E402
from encoder_helpers import randomize, sentence_transformers_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

T = transformers
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Un café, s'il vous plaît — naïve résumé à Zürich!",
         "On 2024-03-01 we paid $3.50 for 42 apples (approx. 8.3 cents each)...", "我爱自然语言处理。東京タワー",
         "Hello,world!!  Tabs\tand\nnewlines", "word " * 300, "a", ""]


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1 - (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = T.BertConfig(vocab_size=60, hidden_size=30, num_hidden_layers=2, num_attention_heads=5,
                          intermediate_size=37, max_position_embeddings=40)
    return randomize(T.BertModel(config), seed)


@pytest.fixture(scope="module")
def st_dirs(tmp_path_factory):
    """A tiny random BERT as sentence-transformers directories, one per pooling: mean + Normalize, cls, max."""
    model = tiny_bert()
    return {pooling: sentence_transformers_dir(model, tmp_path_factory.mktemp(pooling), pooling=pooling,
                                               normalize=pooling == "mean")
            for pooling in ("mean", "cls", "max")}


@pytest.fixture(scope="module")
def sentence_transformers():
    return pytest.importorskip("sentence_transformers")


TINY_TEXTS = ["the cat sat on the mat .", "hello world , how are you today ?", "a", "big red dog ran fast " * 5,
              "the quick brown fox jumps over the lazy dog", "model token text 0 1 2 3"]
SERVED = [t for t in TINY_TEXTS if len(t.split()) < 14]  # the server refuses what is longer than 16 tokens


# --- pipelines ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_sentence_embedding_follows_the_directory_like_sentence_transformers(pooling, st_dirs, sentence_transformers):
    directory = st_dirs[pooling]
    embed = pipeline("sentence-embedding", model=str(directory), device="cpu", dtype="fp32", batch_size=4)
    assert (embed.embedder.pooling, embed.embedder.normalize, embed.embedder.max_length) == (
        pooling, pooling == "mean", 16)
    ours = embed(TINY_TEXTS)
    theirs = sentence_transformers.SentenceTransformer(str(directory), device="cpu").encode(TINY_TEXTS)
    assert ours.shape == theirs.shape == (len(TINY_TEXTS), 30) and ours.dtype == np.float32
    assert cosine_distance(ours, theirs).max() < 1e-5
    assert np.allclose(ours, theirs, atol=1e-5)
    if pooling == "mean":
        assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    single = embed(TINY_TEXTS[1])
    assert single.shape == (30,) and np.allclose(single, ours[1], atol=1e-6)
    as_list = embed(TINY_TEXTS, output="list")
    assert isinstance(as_list[0][0], float) and np.allclose(np.array(as_list), ours, atol=1e-6)


def test_batches_sorted_by_length_come_back_in_input_order(st_dirs):
    directory = st_dirs["mean"]
    one_by_one = pipeline("sentence-embedding", model=str(directory), device="cpu", batch_size=1)
    batched = pipeline("sentence-embedding", model=str(directory), device="cpu", batch_size=4)
    assert np.allclose(one_by_one(TINY_TEXTS), batched(TINY_TEXTS), atol=1e-5)
    assert np.allclose(batched(TINY_TEXTS[::-1]), batched(TINY_TEXTS)[::-1], atol=1e-5)


def test_feature_extraction_is_transformers_own(st_dirs):
    directory = st_dirs["mean"]
    ours = pipeline("feature-extraction", model=str(directory), device="cpu", dtype="fp32")
    theirs = T.pipeline("feature-extraction", model=str(directory), device="cpu")
    got, want = ours(TINY_TEXTS[:3]), theirs(TINY_TEXTS[:3])
    assert [np.array(g).shape for g in got] == [np.array(w).shape for w in want]
    for g, w in zip(got, want):
        assert np.allclose(np.array(g), np.array(w), atol=1e-4)
    one = ours(TINY_TEXTS[0])
    assert isinstance(one, list) and np.array(one).shape == np.array(want[0]).shape
    assert ours(TINY_TEXTS[0], return_tensors=True).shape == (1, len(one[0]), 30)


def test_long_texts_are_cut_or_refused(st_dirs):
    directory = st_dirs["mean"]
    long = "big red dog " * 20
    cut = pipeline("sentence-embedding", model=str(directory), device="cpu")
    exact = pipeline("sentence-embedding", model=str(directory), device="cpu", truncate=False)
    assert np.allclose(cut(long), cut(" ".join(long.split()[:14])), atol=1e-6)  # 16 = [CLS] + 14 + [SEP]
    with pytest.raises(TextTooLong, match="at most 16"):
        exact([TINY_TEXTS[0], long])
    with pytest.raises(ChatforgeError, match="non-empty list"):
        cut([])


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "modules.json").write_text(json.dumps(
        [*json.loads((d / "modules.json").read_text()), {"idx": 3, "name": "3", "path": "3_Dense",
                                                          "type": "sentence_transformers.models.Dense"}])), "Dense"),
    (lambda d: (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_weightedmean_tokens": True})), "weightedmean"),
])
def test_sentence_transformers_modules_chatforge_cannot_compute_are_refused(change, message, st_dirs, tmp_path):
    directory = shutil.copytree(st_dirs["mean"], tmp_path / "st")
    change(directory)
    with pytest.raises(ChatforgeError, match=message):
        load(directory, device="cpu")


# --- the real all-MiniLM-L6-v2 --------------------------------------------------------------------------

def test_minilm_embeddings_equal_sentence_transformers(minilm_dir, sentence_transformers, monkeypatch):
    monkeypatch.setenv("CHATFORGE_HOME", str(minilm_dir.parents[2]))  # the catalogue name finds the pulled copy
    embed = pipeline("sentence-embedding", model="all-minilm-l6-v2", device="cpu", dtype="fp32", batch_size=3)
    model = embed.embedder.model
    assert (model.config.task, model.config.pooling, model.config.normalize, model.config.embed_max_len) == (
        "features", "mean", True, 256)
    ours = embed(TEXTS)
    theirs = sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)
    assert ours.shape == (len(TEXTS), 384)
    assert cosine_distance(ours, theirs).max() < 1e-5


def test_minilm_tokenization_equals_transformers(minilm_dir, tmp_path):
    """tokenizer.json, and the same model's vocab.txt alone (WordPiece built from tokenizer_config.json)."""
    wordpiece = tmp_path / "vocab-only"
    wordpiece.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "config.json"):
        shutil.copy(minilm_dir / name, wordpiece / name)
    for directory in (minilm_dir, wordpiece):
        ours, theirs = read_hf_tokenizer(directory), T.AutoTokenizer.from_pretrained(directory)
        assert {role: ours.special[role] for role in ("cls", "sep", "pad", "mask", "unk")} == {
            "cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}
        for text in TEXTS:
            assert [ours.token_id("cls"), *ours.encode(text), ours.token_id("sep")] == theirs(text)["input_ids"], text
    legacy = T.models.bert.tokenization_bert_legacy.BertTokenizerLegacy(str(wordpiece / "vocab.txt"))
    ours = read_hf_tokenizer(wordpiece)
    assert all(legacy(t)["input_ids"] == [101, *ours.encode(t), 102] for t in TEXTS)


# --- chatforge embed ------------------------------------------------------------------------------------

def test_cli_embed_writes_one_row_per_line(st_dirs, tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TINY_TEXTS) + "\n")
    out = tmp_path / "vectors.npy"
    result = run_cli("embed", "--model", str(st_dirs["mean"]), "--data", str(data), "--out", str(out),
                     "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: {len(TINY_TEXTS)} x 30 float32 (pooling mean, unit length)" in result.stdout
    vectors = np.load(out)
    expected = pipeline("sentence-embedding", model=str(st_dirs["mean"]), device="cpu")(TINY_TEXTS)
    assert vectors.shape == (len(TINY_TEXTS), 30) and np.allclose(vectors, expected, atol=1e-5)
    cls = run_cli("embed", "--model", str(st_dirs["mean"]), "--data", str(data), "--out", str(out),
                  "--pooling", "cls", "--no-normalize")
    assert cls.returncode == 0 and "(pooling cls)" in cls.stdout


@pytest.mark.parametrize("content, out, message", [
    (None, "v.npy", "does not exist"),
    ("", "v.npy", "is empty"),
    ("one\n\nthree\n", "v.npy", "line 2 is empty"),
    (b"\xff\xfe bad", "v.npy", "not UTF-8"),
    ("one\n", "v.txt", "should end in .npy"),
    ("one\n" + "big red dog " * 20 + "\n", "v.npy", "line 2 is 62 tokens long"),
])
def test_cli_embed_bad_input_is_one_line(content, out, message, st_dirs, tmp_path):
    data = tmp_path / "texts.txt"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    result = run_cli("embed", "--model", str(st_dirs["mean"]), "--data", str(data), "--out", str(tmp_path / out),
                     "--no-truncate")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatforge embed: error: ") and message in lines[0], lines
    assert not (tmp_path / out).exists()


# --- POST /v1/embeddings ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(st_dirs, tmp_path_factory):
    """The demo chat model, with the tiny mean-pooled, normalised BERT as the embedding model."""
    db = tmp_path_factory.mktemp("serve-embed") / "conversations.db"
    with ServerProcess("--embedding-model", str(st_dirs["mean"]), "--db", str(db), "--threads", "1",
                       "--max-message-chars", "2000", "--log-level", "warning") as s:
        yield s


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_embeddings_through_the_openai_client(server, st_dirs):
    name = st_dirs["mean"].name
    expected = pipeline("sentence-embedding", model=str(st_dirs["mean"]), device="cpu")(SERVED)
    assert httpx.get(server.url + "/health").json()["embedding_model"] == name
    api = client(server)
    many = api.embeddings.create(model=name, input=SERVED, encoding_format="float")
    assert many.object == "list" and many.model == name and [d.index for d in many.data] == list(range(len(SERVED)))
    vectors = np.array([d.embedding for d in many.data])
    assert vectors.shape == (len(SERVED), 30) and np.allclose(vectors, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    tok = read_hf_tokenizer(st_dirs["mean"])
    tokens = sum(len(tok.encode(t)) + 2 for t in SERVED)  # what the model read: [CLS] text [SEP]
    assert (many.usage.prompt_tokens, many.usage.total_tokens) == (tokens, tokens)
    one = api.embeddings.create(model=name, input=SERVED[0])  # the client asks for base64 and decodes it
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, expected[0], atol=1e-5)
    ids = tok.encode(SERVED[1])
    by_ids = api.embeddings.create(model=name, input=ids, encoding_format="float")
    assert np.allclose(by_ids.data[0].embedding, expected[1], atol=1e-5)
    assert by_ids.usage.prompt_tokens == len(ids) + 2  # [CLS] ids [SEP]
    lists = api.embeddings.create(model=name, input=[ids, tok.encode(SERVED[0])], encoding_format="float")
    assert np.allclose([d.embedding for d in lists.data], expected[[1, 0]], atol=1e-5)


def test_models_lists_the_embedding_model_beside_the_chat_model(server, st_dirs):
    name = st_dirs["mean"].name
    listed = {m.id: m for m in client(server).models.list().data}
    chat = httpx.get(server.url + "/health").json()["model"]
    assert set(listed) == {chat, name}
    card = client(server).models.retrieve(name)
    assert card.id == name and card.model_extra["dimensions"] == 30 and card.model_extra["context_length"] == 16
    assert client(server).models.retrieve(chat).id == chat


def test_base64_is_little_endian_float32(server, st_dirs):
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": st_dirs["mean"].name, "input": SERVED[:2],
                                                          "encoding_format": "base64"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    floats = httpx.post(server.url + "/v1/embeddings", json={"input": SERVED[:2]}).json()
    assert np.array_equal(decoded, np.array([d["embedding"] for d in floats["data"]], dtype=np.float32))
    assert body["usage"] == floats["usage"] and body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("body, param, code, message", [
    ({"input": []}, "input", None, "input is empty"),
    ({"input": ""}, "input", None, "input is empty"),
    ({"input": ["fine", "  "]}, "input", None, "input[1] is empty"),
    ({"input": [[]]}, "input", None, "empty"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, "input", None, f"at most {MAX_INPUTS}"),
    ({"input": "big red dog " * 20}, "input", "context_length_exceeded", "at most 16"),
    ({"input": "x" * 2001}, "input", None, "2000 characters"),
    ({"input": [5, 9999]}, "input", None, "outside the vocabulary"),
    ({"input": "hi", "dimensions": 8}, "dimensions", "unsupported", "cannot shorten"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", None, "float"),
    ({"input": "hi", "model": "text-embedding-3-small"}, "model", "model_not_found", "does not exist"),
    ({"input": [1, "two"]}, "input", None, None),
])
def test_bad_embedding_requests_get_openai_errors(server, body, param, code, message):
    status = 404 if code == "model_not_found" else 400
    error = error_of(httpx.post(server.url + "/v1/embeddings", json=body), status)
    assert error["param"] == param and (code is None or error["code"] == code), error
    assert message is None or message in error["message"], error


def test_the_openai_client_raises_on_a_too_long_input(server, st_dirs):
    with pytest.raises(openai.BadRequestError, match="reads at most 16") as e:
        client(server).embeddings.create(model=st_dirs["mean"].name, input=["ok", "big red dog " * 20])
    assert e.value.code == "context_length_exceeded" and e.value.param == "input"
    ok = client(server).embeddings.create(model=st_dirs["mean"].name, input="hi", dimensions=30)
    assert len(ok.data[0].embedding) == 30  # the model's own size is no shortening


def test_without_an_embedding_model_the_endpoint_says_how_to_enable_it(tmp_path):
    with ServerProcess("--db", str(tmp_path / "c.db"), "--threads", "1", "--log-level", "warning") as s:
        with pytest.raises(openai.BadRequestError, match="--embedding-model"):
            client(s).embeddings.create(model="anything", input="hello")
        error = error_of(httpx.post(s.url + "/v1/embeddings", json={"input": "hello"}))
        assert error["code"] == "embeddings_not_enabled"
        assert "embedding_model" not in httpx.get(s.url + "/health").json()
        assert len(client(s).models.list().data) == 1


def test_minilm_served_beside_the_chat_model_equals_sentence_transformers(minilm_dir, sentence_transformers,
                                                                           tmp_path):
    home = str(minilm_dir.parents[2])
    with ServerProcess("--embedding-model", "all-minilm-l6-v2", "--db", str(tmp_path / "c.db"), "--threads", "1",
                       "--log-level", "warning", env={"CHATFORGE_HOME": home}) as s:
        got = client(s).embeddings.create(model="all-minilm-l6-v2", input=TEXTS[:5])
        chat = client(s).chat.completions.create(model="chatforge-demo", max_tokens=4,
                                                 messages=[{"role": "user", "content": "Hello"}])
    theirs = sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS[:5])
    assert cosine_distance(np.array([d.embedding for d in got.data]), theirs).max() < 1e-5
    assert chat.choices[0].message.content is not None


def test_an_exported_encoder_embeds_in_sentence_transformers_as_in_chatforge(st_dirs, sentence_transformers,
                                                                            tmp_path):
    """Exported, a loaded sentence-transformers encoder keeps its pooling (modules.json is written again);
    an encoder without MLM head has no masked-LM accuracy for `chatforge eval` to measure."""
    from chatforge.export import export_hf
    from chatforge.train.evaluate import evaluate

    out = export_hf(str(st_dirs["max"]), tmp_path / "exported")
    ours = pipeline("sentence-embedding", model=str(st_dirs["max"]), device="cpu")(TINY_TEXTS)
    theirs = sentence_transformers.SentenceTransformer(str(out), device="cpu").encode(TINY_TEXTS)
    assert np.allclose(ours, theirs, atol=1e-5)
    data = tmp_path / "held_out.txt"
    data.write_text("the cat sat on the mat .\n")
    with pytest.raises(ChatforgeError, match="no masked-LM head"):
        evaluate(str(out), str(data), device="cpu")
