"""Chat templates, context budgets, SFT loss masks and the Conversation object."""
from __future__ import annotations

import pytest

from chatforge.chat.conversation import Conversation
from chatforge.chat.template import CHATML_TEMPLATE, FALLBACK_TEMPLATE, ChatFormat
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer

MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine, thanks."},
]


@pytest.fixture
def chatml():
    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ!?,."])
    tok.chat_template = CHATML_TEMPLATE
    return ChatFormat.for_tokenizer(tok)


def test_chatml_rendering_with_generation_prompt(chatml):
    text = chatml.render(MSGS[:2])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not chatml.render(MSGS[:2], add_generation_prompt=False).endswith("assistant\n")


def test_template_specials_are_tokens_but_user_text_is_not(chatml):
    tok = chatml.tokenizer
    ids = chatml.encode([{"role": "user", "content": "x<|im_end|>y"}])
    assert ids.count(tok.token_id("im_end")) == 1  # only the template's own end of turn
    assert tok.decode(ids) == "<|im_start|>user\nx<|im_end|>y<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("content", ["s", "user", "im_start", "\n", "assistant\n"])
def test_short_messages_that_also_occur_in_the_template_text_stay_plain_text(chatml, content):
    tok = chatml.tokenizer
    msgs = [{"role": "user", "content": content}, {"role": "assistant", "content": "<|im_end|>"}]
    ids = chatml.encode(msgs, add_generation_prompt=False)
    assert tok.decode(ids) == chatml.render(msgs, add_generation_prompt=False)
    # the template's own markers are one token each: two turns = two starts and two ends
    assert ids.count(tok.token_id("im_start")) == 2 and ids.count(tok.token_id("im_end")) == 2
    start = ids.index(tok.token_id("im_start"))
    assert ids[start + 1:start + 1 + len(tok.encode("user\n" + content))] == tok.encode("user\n" + content)


def test_a_template_that_rewrites_content_still_encodes_what_it_renders():
    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ!?,.:"])
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content | upper }}\n{% endfor %}"
    fmt = ChatFormat.for_tokenizer(tok)
    ids = fmt.encode([{"role": "user", "content": "hi there"}])
    assert tok.decode(ids) == "user: HI THERE\n"


def test_fallback_template_for_base_models():
    tok = Tokenizer.train_char(["abc"])
    fmt = ChatFormat.for_tokenizer(tok)
    assert fmt.is_fallback and fmt.template == FALLBACK_TEMPLATE
    assert fmt.render(MSGS[:2]) == "Be brief.\n\nUser: Hi there\nAssistant:"
    assert "\nUser:" in fmt.stop


def test_loss_mask_covers_exactly_assistant_tokens_and_end_of_turn(chatml):
    ids, mask = chatml.encode_for_training(MSGS)
    tok = chatml.tokenizer
    assert len(ids) == len(mask) and ids == chatml.encode(MSGS, add_generation_prompt=False)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "Hello!<|im_end|>Fine, thanks.<|im_end|>"
    # every masked-in span ends with an end-of-turn token
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    assert len(spans) == 2 and all(s[-1] == tok.token_id("im_end") for s in spans)


def test_a_conversation_without_assistant_reply_cannot_train(chatml):
    with pytest.raises(ChatforgeError, match="no assistant message"):
        chatml.encode_for_training(MSGS[:2])


def test_context_budget_drops_oldest_turns_keeps_system_and_reports(chatml):
    full = len(chatml.encode(MSGS))
    kept, dropped = chatml.fit(MSGS, full)
    assert dropped == 0 and kept == MSGS
    kept, dropped = chatml.fit(MSGS, full - 1)
    assert dropped == 2 and kept[0]["role"] == "system" and kept[1]["content"] == "How are you?"
    with pytest.raises(ChatforgeError, match="the last message alone"):
        chatml.fit([{"role": "user", "content": "x" * 100}], 20)


@pytest.mark.parametrize("bad,fragment", [
    ([], "empty"),
    ([{"role": "wizard", "content": "x"}], "unknown role 'wizard'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "must be a string"),
])
def test_bad_messages(chatml, bad, fragment):
    with pytest.raises(ChatforgeError, match=fragment):
        chatml.encode(bad) if bad else chatml.fit(bad, 100)


def test_invalid_template_is_a_clear_error():
    tok = Tokenizer.train_char(["abc"])
    tok.chat_template = "{% for m in messages %}"
    with pytest.raises(ChatforgeError, match="not valid Jinja"):
        ChatFormat.for_tokenizer(tok).render(MSGS)


def test_conversation_api():
    conv = Conversation("Hello, how are you?")
    assert conv.new_user_input == "Hello, how are you?"
    conv.append_response("Fine.")
    conv.add_user_input("Good.")
    conv.add_message({"role": "assistant", "content": "Yes."})
    assert conv.past_user_inputs == ["Hello, how are you?", "Good."]
    assert conv.generated_responses == ["Fine.", "Yes."]
    assert conv.new_user_input is None
    assert repr(conv).splitlines()[1:] == ["user: Hello, how are you?", "assistant: Fine.", "user: Good.",
                                           "assistant: Yes."]
    assert list(conv.iter_texts())[0] == (True, "Hello, how are you?")
    conv2 = Conversation(conv.messages, system="sys")
    assert conv2.messages[0] == {"role": "system", "content": "sys"} and len(conv2) == 5
    conv2.clear()
    assert conv2.messages == [{"role": "system", "content": "sys"}]
    with pytest.raises(ChatforgeError):
        conv.add_message({"role": "bot", "content": "?"})
