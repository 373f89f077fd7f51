"""Chat fine-tuning: JSONL parsing, loss masks through packing, and a tiny run on the one Trainer."""
from __future__ import annotations

import json

import pytest
import torch

from chatforge.chat.template import CHATML_TEMPLATE, ChatFormat
from chatforge.config import ModelConfig, TrainConfig
from chatforge.errors import ConfigError, DataError
from chatforge.loader import load
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.train.objectives import IGNORE_INDEX
from chatforge.data.chats import PackedChats, pack, read_chat_jsonl
from chatforge.train.sft import ChatSFT

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"},
     {"role": "assistant", "content": "Fine."}, {"role": "user", "content": "And you?"},
     {"role": "assistant", "content": "Good, thanks."}],
    [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No jokes today, sorry."}],
    [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye, friend."}],
]


@pytest.fixture
def fmt() -> ChatFormat:
    tok = Tokenizer.train_char(["Hello, how are you? I am fine. abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ!"])
    tok.chat_template = CHATML_TEMPLATE
    return ChatFormat.for_tokenizer(tok)


def learned_runs(tokens, mask) -> list[list[int]]:
    """Maximal runs of consecutive tokens whose mask is 1."""
    runs, current = [], []
    for t, m in zip(tokens, mask):
        if m:
            current.append(int(t))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def expected_runs(fmt: ChatFormat, conversations) -> list[list[int]]:
    im_end = fmt.tokenizer.token_id("im_end")
    return [fmt.tokenizer.encode(m["content"]) + [im_end] for c in conversations for m in c if m["role"] == "assistant"]


def test_mask_covers_exactly_assistant_tokens_and_end_of_turn(fmt):
    for conv in CONVERSATIONS:
        ids, mask = fmt.encode_for_training(conv)
        assert learned_runs(ids, mask) == expected_runs(fmt, [conv])


def test_packing_carries_the_mask_and_labels_cover_only_assistant_tokens(fmt):
    packed = PackedChats.build(CONVERSATIONS * 3, fmt, block_size=128)
    assert packed.stats["truncated"] == 0 and packed.stats["packed"] == 12
    assert len(packed) < 12  # several conversations share a row
    runs = [r for row, m in zip(packed.tokens, packed.mask) for r in learned_runs(row, m)]
    assert sorted(runs) == sorted(expected_runs(fmt, CONVERSATIONS * 3))
    # conversations are never split: every row starts a conversation, and each one's turns are together
    im_start = fmt.tokenizer.token_id("im_start")
    assert all(row[0] == im_start for row in packed.tokens)
    n_turns = sum(len(c) for c in CONVERSATIONS * 3)
    assert int((packed.tokens == im_start).sum()) == n_turns
    # the batch's labels are the next tokens exactly where the mask is 1 (shifted by one), else ignored
    batch = packed.batch(list(range(len(packed))))
    tokens, mask = torch.from_numpy(packed.tokens).long(), torch.from_numpy(packed.mask).bool()
    assert torch.equal(batch["input_ids"], tokens[:, :-1])
    assert torch.equal(batch["labels"] != IGNORE_INDEX, mask[:, 1:])
    assert torch.equal(batch["labels"][mask[:, 1:]], tokens[:, 1:][mask[:, 1:]])


def test_a_conversation_longer_than_a_row_is_truncated_and_counted(fmt):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "abcdefghij " * 20}]
    late = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "late"}]
    packed = PackedChats.build([long, late, CONVERSATIONS[0]], fmt, block_size=40)
    assert packed.stats["truncated"] == 2
    assert packed.stats["dropped"] == 1  # `late`'s reply starts beyond the row: nothing to learn
    assert packed.stats["packed"] == 2
    assert packed.tokens.shape[1] == 41


def test_best_fit_packing_fills_rows():
    bins = pack([6, 5, 4, 3, 2, 1, 9], capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum([6, 5, 4, 3, 2, 1, 9][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3


def write(path, lines):
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


GOOD = {"messages": CONVERSATIONS[0]}


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [', "not valid JSON"),
    ({"conversation": []}, "missing 'messages'"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ([1, 2], "expected a JSON object"),
    ({"messages": [{"role": "user"}]}, "must be an object with 'role' and 'content'"),
])
def test_malformed_jsonl_names_the_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "chats.jsonl", [GOOD, "", bad, GOOD])  # the blank line still counts
    with pytest.raises(DataError, match=rf"chats\.jsonl:3: .*{message}"):
        read_chat_jsonl([str(path)])


def test_prompt_completion_pairs_and_folders(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "a.jsonl", [{"prompt": "Hi", "completion": "Hello!"},
                               {"prompt": "Q", "completion": "A", "system": "Be kind."}])
    write(folder / "b.jsonl", [GOOD])
    (folder / "README.md").write_text("not chat data\n")
    convs = read_chat_jsonl([str(folder)])
    assert convs[0] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert convs[1][0] == {"role": "system", "content": "Be kind."}
    assert convs[2] == CONVERSATIONS[0]
    empty = write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match="no conversations"):
        read_chat_jsonl([str(empty)])


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "chats.jsonl"
    rows = [{"messages": c} for c in CONVERSATIONS] * 10 + [{"prompt": "Hi", "completion": "Hello there!"}] * 10
    return write(path, rows)


def tiny_config(out_dir, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), max_steps=24, batch_size=4, lr=3e-3, warmup_steps=2, eval_interval=8,
                eval_iters=2, log_interval=4, device="cpu", precision="fp32", progress=False)
    return TrainConfig(**{**base, **kw})


def test_tiny_finetune_loss_falls_and_saves_a_chat_checkpoint(tmp_path, chat_model_dir, chat_data, one_thread):
    from chatforge.train.finetune import finetune_chat

    result = finetune_chat([str(chat_data)], str(chat_model_dir), tiny_config(tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 3 and losses == sorted(losses, reverse=True) and losses[-1] < losses[0] * 0.9
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    assert train[-1] < train[0]
    assert result["step"] == 24 and result["data"]["train"]["truncated"] == 0
    assert (tmp_path / "run" / "loss.png").is_file()
    model, tok = load(result["model_dir"])
    assert tok.chat_template == CHATML_TEMPLATE  # the template travels with the checkpoint
    # resume continues the same run from last/ to a larger max_steps
    again = finetune_chat([], str(chat_model_dir), tiny_config(tmp_path / "run", max_steps=28), resume=True)
    assert again["step"] == 28
    with pytest.raises(ConfigError, match="already holds a training run"):
        finetune_chat([str(chat_data)], str(chat_model_dir), tiny_config(tmp_path / "run"))


def test_chat_sft_validation_averages_over_assistant_tokens(fmt):
    splits = {s: PackedChats.build(CONVERSATIONS, fmt, block_size=64) for s in ("train", "val")}
    objective = ChatSFT(splits)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", vocab_size=fmt.tokenizer.vocab_size, block_size=64)).eval()
    n = objective.eval_batches(2)
    sums: dict[str, float] = {}
    with torch.no_grad():
        for i in range(n):
            batch = objective.collate("val", objective.eval_items(i, 2, None))
            for k, v in objective.evaluate(model, batch).items():
                sums[k] = sums.get(k, 0.0) + v
        whole = objective.collate("val", torch.arange(len(splits["val"])))
        expected = float(objective.loss(model, whole))
    assert sums["count"] == splits["val"].stats["loss_tokens"]
    assert objective.summarize(sums, n)["val_loss"] == pytest.approx(expected, rel=1e-5)
