"""pipeline("conversational" | "text-generation") on a tiny checkpoint made here."""
from __future__ import annotations

import pytest

from chatforge import Conversation, pipeline
from chatforge.engine import Engine
from chatforge.errors import ChatforgeError
from chatforge.loader import load


@pytest.fixture(scope="module")
def chatbot(chat_model_dir):
    return pipeline("conversational", model=str(chat_model_dir), max_new_tokens=12, temperature=0)


def test_plain_string_returns_the_conversation_with_a_reply(chatbot, chat_model_dir):
    conv = chatbot("Hello, how are you?")
    assert isinstance(conv, Conversation)
    assert conv.past_user_inputs == ["Hello, how are you?"]
    assert len(conv.generated_responses) == 1
    # the reply is exactly the engine's greedy continuation of the templated prompt
    model, tok = load(str(chat_model_dir))
    ids = chatbot.chat.format.encode([{"role": "user", "content": "Hello, how are you?"}])
    expected = Engine(model, tok).generate(ids, max_new_tokens=12, temperature=0)[0].text.strip()
    assert conv.generated_responses[0] == expected
    assert repr(conv).splitlines()[-1] == f"assistant: {expected}"


def test_messages_and_conversation_objects_and_multi_turn(chatbot):
    conv = chatbot([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    conv.add_user_input("And then?")
    same = chatbot(conv)
    assert same is conv and len(conv.generated_responses) == 2


def test_batch_of_conversations_equals_one_at_a_time(chatbot):
    texts = ["Hi", "How are you today, my friend?", "abc"]
    batch = chatbot([Conversation(t) for t in texts])
    single = [chatbot(t) for t in texts]
    assert [c.generated_responses for c in batch] == [c.generated_responses for c in single]


def test_generation_options_pass_through(chatbot):
    short = chatbot("Hello", max_new_tokens=2)
    assert len(chatbot.tokenizer.encode(short.generated_responses[0])) <= 2
    a = chatbot("Hello", temperature=1.0, seed=3, max_new_tokens=8)
    b = chatbot("Hello", temperature=1.0, seed=3, max_new_tokens=8)
    assert a.generated_responses == b.generated_responses
    assert chatbot("Hello", do_sample=False).generated_responses == chatbot("Hello").generated_responses
    with pytest.raises(ChatforgeError, match="unknown generation option"):
        chatbot("Hello", beams=4)


def test_context_overflow_drops_old_turns_with_a_warning(chat_model_dir):
    bot = pipeline("conversational", model=str(chat_model_dir), max_new_tokens=8, temperature=0)
    conv = Conversation([{"role": "system", "content": "sys"}])
    for i in range(6):
        conv.add_user_input("tell me a long story " * 3)
        conv.append_response("once upon a time " * 3)
    conv.add_user_input("end")
    with pytest.warns(UserWarning, match="oldest .* message"):
        bot(conv)
    assert conv.dropped_messages > 0 and conv.messages[0]["role"] == "system"


@pytest.mark.parametrize("bad,fragment", [
    ("", "empty"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "end with a user message"),
    ([{"role": "robot", "content": "hi"}], "unknown role"),
])
def test_bad_conversations(chatbot, bad, fragment):
    with pytest.raises(ChatforgeError, match=fragment):
        chatbot(bad)


def test_message_longer_than_the_context_is_refused(chatbot):
    with pytest.raises(ChatforgeError, match="last message alone"):
        chatbot("word " * 400)


def test_text_generation(chat_model_dir):
    gen = pipeline("text-generation", model=str(chat_model_dir), max_new_tokens=5, temperature=0)
    out = gen("Hello")
    assert out[0]["generated_text"].startswith("Hello") and len(out[0]["generated_text"]) > 5
    tail = gen("Hello", return_full_text=False)[0]["generated_text"]
    assert out[0]["generated_text"] == "Hello" + tail
    assert len(gen(["a", "b"])) == 2


def test_unknown_task_and_model():
    with pytest.raises(ChatforgeError, match="unknown task"):
        pipeline("summarization")
    with pytest.raises(ChatforgeError, match="unknown model 'nope'"):
        pipeline("conversational", model="nope")


def test_int8_pipeline_and_cli_flag(chatty_model_dir):
    from conftest import run_cli

    from chatforge.quantize import GGMLLinear, Int8Linear

    chatbot = pipeline("conversational", model=str(chatty_model_dir), quantize="int8", max_new_tokens=8, temperature=1,
                       seed=0)
    model = chatbot.engine.model  # int8: Q8_0 blocks where chatforge's kernels are, per-row int8 elsewhere
    assert model.quantized == "int8" and any(isinstance(m, (Int8Linear, GGMLLinear)) for m in model.modules())
    assert chatbot("Hello").generated_responses[-1]
    with pytest.raises(ChatforgeError, match="quantize"):
        pipeline("fill-mask", model=str(chatty_model_dir), quantize="int8")
    for verb in (["chat", "--prompt", "Hello"], ["generate", "--prompt", "Hello"]):
        result = run_cli(*verb, "--model", str(chatty_model_dir), "--quantize", "int8", "--max-new-tokens", "5",
                         "--temperature", "1", "--seed", "0")
        assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_int4_pipeline_cli_flag_and_serve_option():
    from conftest import run_cli

    from chatforge.errors import ConfigError
    from chatforge.quantize import GGMLLinear, Int4Linear
    from chatforge.server.settings import ServeConfig

    chatbot = pipeline("conversational", quantize="int4", max_new_tokens=8, temperature=0)  # the demo model
    model = chatbot.engine.model  # int4: Q4_1 blocks where chatforge's kernels are, torch's int4 elsewhere
    assert model.quantized == "int4" and any(isinstance(m, (Int4Linear, GGMLLinear)) for m in model.modules())
    assert chatbot("Hello, how are you?").generated_responses[-1].strip()
    for verb in (["chat", "--prompt", "Hello"], ["generate", "--prompt", "The weather today is"]):
        result = run_cli(*verb, "--model", "chatforge-demo", "--quantize", "int4", "--max-new-tokens", "5",
                         "--temperature", "0")
        assert result.returncode == 0 and result.stdout.strip(), result.stderr
    bad = run_cli("chat", "--quantize", "int3", "--prompt", "Hello")
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr
    assert ServeConfig(quantize="int4").quantize == "int4"
    with pytest.raises(ConfigError, match="unknown quantize 'int3'; use int8 or int4"):
        ServeConfig(quantize="int3")
