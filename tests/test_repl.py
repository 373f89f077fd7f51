"""`chatforge chat` driven through a pseudo-terminal, as a person would use it."""
from __future__ import annotations

import json
import sys

import pexpect
import pytest

from conftest import run_cli

STATS = r"\[\d+ tokens, [\d.]+ tokens/s\]"


def spawn(model_dir, *extra):
    child = pexpect.spawn(sys.executable, ["-m", "chatforge.cli", "chat", "--model", str(model_dir), *extra],
                          encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect(">>> ")
    return child


def saved(child, path):
    child.sendline(f"/save {path}")
    child.expect(r"\[saved \d+ messages")
    child.expect(">>> ")
    return json.loads(path.read_text())["messages"]


def test_multi_turn_clear_system_and_ctrl_c(chatty_model_dir, tmp_path):
    child = spawn(chatty_model_dir, "--max-new-tokens", "6", "--temperature", "1", "--seed", "0")
    child.sendline("Hello there")
    child.expect(STATS)
    child.expect(">>> ")
    child.sendline("How are you?")
    child.expect(STATS)
    child.expect(">>> ")
    msgs = saved(child, tmp_path / "a.json")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "How are you?" and msgs[1]["content"]

    child.sendline("/clear")
    child.expect(r"\[conversation cleared\]")
    child.expect(">>> ")
    assert saved(child, tmp_path / "b.json") == []

    child.sendline("/system You are terse.")
    child.expect(r"\[system prompt set")
    child.expect(">>> ")
    child.sendline("/set max_new_tokens 6000")
    child.expect(r"\[max_new_tokens = 6000\]")
    child.expect(">>> ")
    child.sendline("Tell me everything")
    child.expect("Tell me everything\r\n")  # the echo of the input line
    child.expect("[a-z]{5}")  # the reply is streaming
    child.sendintr()  # Ctrl-C stops the reply, not the program
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    msgs = saved(child, tmp_path / "c.json")
    assert msgs[0] == {"role": "system", "content": "You are terse."}
    assert msgs[1]["content"] == "Tell me everything"
    assert 5 <= len(msgs[2]["content"]) < 6000  # the partial reply is kept
    child.sendline("/set max_new_tokens 6")  # short replies again for the rest
    child.expect(r"\[max_new_tokens = 6\]")
    child.expect(">>> ")

    child.sendline("/help")
    child.expect("/system TEXT")
    child.sendline("/bogus")
    child.expect("unknown command /bogus")
    child.sendline('"""first line')
    child.sendline('second line"""')
    child.expect(STATS)
    child.expect(">>> ")
    assert saved(child, tmp_path / "d.json")[-2]["content"] == "first line\nsecond line"
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_at_the_prompt_does_not_leave_and_ctrl_d_does(chat_model_dir):
    child = spawn(chat_model_dir)
    child.sendintr()
    child.expect("use /exit or Ctrl-D")
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_prompt_flag_prints_one_reply_for_scripts(chat_model_dir):
    a = run_cli("chat", "--model", str(chat_model_dir), "--prompt", "Hello", "--temperature", "0",
                "--max-new-tokens", "8")
    b = run_cli("chat", "--model", str(chat_model_dir), "--prompt", "Hello", "--temperature", "0",
                "--max-new-tokens", "8")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.endswith("\n") and a.stderr == ""


@pytest.mark.parametrize("args,fragment", [
    (["--prompt", "   "], "the message is empty"),
    (["--prompt", "x " * 400], "last message alone"),
    (["--temperature", "-1", "--prompt", "hi"], "temperature must be >= 0"),
])
def test_bad_chat_input_is_one_line_and_non_zero(chat_model_dir, args, fragment):
    r = run_cli("chat", "--model", str(chat_model_dir), *args)
    assert r.returncode == 2 and fragment in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("model,fragment", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("/no/such/dir", "the path does not exist"),
])
def test_unknown_model_or_not_a_checkpoint(model, fragment, tmp_path):
    r = run_cli("chat", "--model", model, "--prompt", "hi")
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr
    r = run_cli("chat", "--model", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "not a checkpoint directory" in r.stderr
