"""The built-in demo model: present, small, and it chats (English to English, Chinese to Chinese)."""
from __future__ import annotations

import json
import re

import pytest

from chatforge import Conversation, pipeline
from chatforge.chat.session import ChatModel
from chatforge.engine import Engine, GenerationConfig
from chatforge.loader import demo_model_path, load

HAN = re.compile(r"[\u3400-\u9fff]")


@pytest.fixture(scope="module")
def demo_chat() -> ChatModel:
    model, tok = load(None, device="cpu")
    return ChatModel(Engine(model, tok), GenerationConfig(max_new_tokens=64, temperature=0.0))


def greedy(chat: ChatModel, text: str):
    conv = Conversation(text)
    [gen] = chat.reply([conv])
    return conv.generated_responses[-1], gen


def test_demo_checkpoint_is_a_normal_small_checkpoint():
    path = demo_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "model_card.json"):
        assert (path / name).is_file(), name
    assert sum(f.stat().st_size for f in path.iterdir()) < 50 * 2**20
    assert "<|im_start|>" in json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    card = json.loads((path / "model_card.json").read_text())
    assert card["heldout"]["greedy"]["ends_with_end_of_turn"] >= 0.95


def test_spec_snippet_prints_a_reply(capsys):
    chatbot = pipeline("conversational")
    print(chatbot("Hello, how are you?"))
    out = capsys.readouterr().out
    assert "user: Hello, how are you?" in out
    reply = out.rsplit("assistant: ", 1)[1].strip()
    assert reply


def test_greedy_reply_to_english_is_english_and_stops(demo_chat):
    reply, gen = greedy(demo_chat, "Hello, how are you?")
    assert gen.finish_reason == "stop"
    assert reply and re.search(r"[A-Za-z]", reply) and not HAN.search(reply)


def test_greedy_reply_to_chinese_is_chinese_and_stops(demo_chat):
    reply, gen = greedy(demo_chat, "你好")
    assert gen.finish_reason == "stop"
    assert HAN.search(reply)
