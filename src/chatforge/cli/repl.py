"""`chatforge chat`: an interactive chat in the terminal, or one scripted reply with --prompt.

Replies come from chat.session.ChatModel, starting from its chat defaults; a bad setting (from a
flag or `/set`) is GenerationConfig's error, printed on one line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

from chatforge.engine import GenerationConfig
from chatforge.errors import ChatforgeError
from chatforge.chat.conversation import Conversation
from chatforge.chat.session import ChatModel

HELP = """commands:
  /help                 this help
  /clear                forget the conversation (keeps the system prompt)
  /system TEXT          set the system prompt (and start over)
  /set NAME VALUE       change a sampling option: temperature, top_k, top_p, min_p,
                        repetition_penalty, max_new_tokens, seed (VALUE 'none' unsets)
  /show                 the current options and conversation length
  /save FILE            write the conversation as JSON
  /exit                 leave (or Ctrl-D)
Multi-line input: end a line with \\ to continue it, or wrap a block in triple quotes.
Ctrl-C stops a reply without leaving."""

SETTABLE = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repetition_penalty": float,
            "max_new_tokens": int, "seed": int}


class Repl:
    """The read-say loop over one conversation, with /commands."""

    def __init__(self, chat: ChatModel, config: GenerationConfig, system: Optional[str] = None,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.chat, self.config, self.out, self.err = chat, config, out, err
        self.conversation = Conversation(system=system)

    # --- one turn -------------------------------------------------------------------------
    def say(self, text: str, show_stats: bool = True) -> str:
        """Stream the reply to `text`; Ctrl-C ends the reply early and keeps what was said."""
        if not text.strip():
            raise ChatforgeError("the message is empty: type something")
        self.conversation.add_user_input(text)
        try:
            reply = self.chat.stream(self.conversation, self.config)
        except ChatforgeError:
            self.conversation.messages.pop()  # the message was not answered; don't keep it
            raise
        if reply.dropped_messages:
            self.err.write(f"[context full: the oldest {reply.dropped_messages} message(s) are no longer "
                           "seen by the model]\n")
        stopped = False
        try:
            for piece in reply:
                self.out.write(piece)
                self.out.flush()
        except KeyboardInterrupt:
            reply.pieces.close()
            stopped = True
        self.out.write("\n")
        self.out.flush()
        if show_stats:
            n = reply.generation.completion_tokens if reply.generation else None
            note = "stopped" if stopped else f"{n} tokens"
            rate = f", {reply.tokens_per_second:.1f} tokens/s" if reply.generation else ""
            self.err.write(f"[{note}{rate}]\n")
            self.err.flush()
        return self.conversation.messages[-1]["content"]

    # --- commands ---------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("exit", "quit", "q"):
            return False
        if name == "help":
            self.out.write(HELP + "\n")
        elif name == "clear":
            self.conversation.clear()
            self.out.write("[conversation cleared]\n")
        elif name == "system":
            if not arg:
                raise ChatforgeError("usage: /system TEXT")
            self.conversation = Conversation(system=arg)
            self.out.write("[system prompt set; conversation restarted]\n")
        elif name == "set":
            self._set(arg)
        elif name == "show":
            opts = {k: getattr(self.config, k) for k in SETTABLE}
            self.out.write(f"{opts}\n[{len(self.conversation)} messages]\n")
        elif name == "save":
            if not arg:
                raise ChatforgeError("usage: /save FILE")
            path = Path(arg).expanduser()
            try:
                path.write_text(json.dumps({"messages": self.conversation.messages}, indent=2, ensure_ascii=False))
            except OSError as e:
                raise ChatforgeError(f"cannot write {path}: {e.strerror}") from None
            self.out.write(f"[saved {len(self.conversation)} messages to {path}]\n")
        else:
            raise ChatforgeError(f"unknown command /{name}; type /help")
        return True

    def _set(self, arg: str) -> None:
        parts = arg.split()
        if len(parts) != 2 or parts[0] not in SETTABLE:
            raise ChatforgeError(f"usage: /set NAME VALUE with NAME one of {', '.join(SETTABLE)}")
        name, raw = parts
        try:
            value = None if raw.lower() == "none" else SETTABLE[name](raw)
        except ValueError:
            raise ChatforgeError(f"{name} needs a {SETTABLE[name].__name__}, got {raw!r}") from None
        self.config = self.config.replace(**{name: value})
        self.out.write(f"[{name} = {value}]\n")

    # --- the loop -------------------------------------------------------------------------------
    def read_message(self) -> Optional[str]:
        """One message from the user (None at end of input); handles continuation lines."""
        try:
            line = input(">>> ")
        except EOFError:
            return None
        if line.strip().startswith('"""'):
            lines = [line.strip()[3:]]
            while not lines[-1].rstrip().endswith('"""'):
                try:
                    lines.append(input("... "))
                except EOFError:
                    break
            lines[-1] = lines[-1].rstrip().removesuffix('"""')
            return "\n".join(lines).strip("\n")
        lines = [line]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            try:
                lines.append(input("... "))
            except EOFError:
                break
        return "\n".join(lines)

    def run(self) -> int:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.out.write("chatforge chat — type /help for commands, /exit to leave.\n")
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.out.write("\n[use /exit or Ctrl-D to leave]\n")
                continue
            if text is None:
                self.out.write("\n")
                return 0
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    if not self.command(text.strip()):
                        return 0
                else:
                    self.say(text)
            except ChatforgeError as e:
                self.err.write(f"error: {e}\n")


def run_chat(model: Optional[str] = None, *, prompt: Optional[str] = None, system: Optional[str] = None,
             device: str = "auto", dtype: Optional[str] = None, quantize: Optional[str] = None,
             speculative: Any = None, **options: Any) -> int:
    """The `chatforge chat` verb: a REPL, or with `prompt` one reply printed to stdout. speculative: see Engine."""
    from chatforge.engine import Engine
    from chatforge.loader import load_chat_model
    from chatforge.pipelines.generation import generation_options

    def warn(note: str) -> None:
        print(f"chatforge chat: warning: {note}", file=sys.stderr, flush=True)

    # no model named: the default chat model (smollm2, pulled on first use), else the demo model, with a warning
    model_obj, tokenizer, _ = load_chat_model(model, device=device, dtype=dtype, quantize=quantize, warn=warn)
    chat = ChatModel(Engine(model_obj, tokenizer, speculative=speculative))
    config = chat.defaults.replace(**generation_options(options))
    repl = Repl(chat, config, system=system)
    if prompt is not None:
        repl.say(prompt, show_stats=False)
        return 0
    return repl.run()
