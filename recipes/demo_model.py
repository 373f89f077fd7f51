"""Rebuild chatforge's built-in demo chat model (src/chatforge/demo/) with one command.

    bash recipes/demo_model.sh                   # installs what it needs, then runs this file
    python recipes/demo_model.py --work runs/demo --out src/chatforge/demo

About 10 minutes on 2 idle CPU cores (30-45 when other work shares them); nothing comes from a
model hub. Stages (each one is skipped when its output already exists in --work, so an interrupted
run continues):

1. sources   Debian packages (apt-get): bible-kjv(-text), fortunes, fortunes-min, fortunes-zh;
             PyPI: the chatterbot-corpus wheel (`pip download`, only its YAML files are read)
2. data      prose mix (KJV verses, English and Chinese fortunes, the dialogues as plain text),
             chat JSONL: chatterbot's English and Chinese dialogues as ChatML conversations plus
             self-description and greeting pairs written here; ~10% of the distinct first
             prompts (per language) are held out with their replies
3. pretrain  byte-level BPE (4096) + a small Llama-style decoder (rope, rmsnorm, swiglu, GQA)
             on the prose mix: `chatforge.train.pretrain.pretrain`
4. sft       chat fine-tuning on the conversations: `chatforge.train.finetune.finetune_chat`
5. evaluate  replies to the held-out prompts: share ending with end-of-turn, share in the
             prompt's language, overlap with the reference replies / their category
6. export    config.json, model.safetensors, tokenizer files and model_card.json to --out
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import unicodedata
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APT_PACKAGES = ["bible-kjv", "bible-kjv-text", "fortunes", "fortunes-min", "fortunes-zh"]
CORPUS_PACKAGE = "chatterbot-corpus==1.3.3"
FORTUNES = Path("/usr/share/games/fortunes")
CHINESE_FORTUNES = ("chinese", "tang300", "song100")
SKIP_FORTUNES = ("art", "ascii-art", "translate-me")  # pictures, and a file of untranslated strings
LANGUAGES = ("english", "chinese")
# botprofile: chatterbot's own persona (the demo model has its own, SELF_* below); coding: Python
# programs as replies, beyond a model this size (it learns to start one and never stop)
SKIP_CATEGORIES = ("botprofile", "coding")

MODEL = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, block_size=256, pos_encoding="rope", mlp="swiglu",
             norm="rmsnorm", bias=False, tie_embeddings=True)
CONTEXT = 512  # the released model's context; pre-training uses 256-token blocks (rope has no learned table)

# --- written here: who the model is, and greetings in both languages ---------------------

SELF_EN = [
    (["Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.", "What is this?"],
     ["I am chatforge's demo model, a tiny chat model that was trained in half an hour on a laptop-sized computer.",
      "I'm the chatforge demo model: a small language model that knows greetings and a little small talk."]),
    (["What is your name?", "What's your name?", "Do you have a name?"],
     ["My name is chatforge demo. I am the small model that comes with chatforge.",
      "I am called the chatforge demo model."]),
    (["Are you a robot?", "Are you human?", "Are you a person?", "Are you real?"],
     ["I am not a person. I am a small language model, the demo model of chatforge.",
      "No, I am a computer program: chatforge's tiny demo chat model."]),
    (["Who made you?", "Who created you?", "Who trained you?", "Where do you come from?"],
     ["I was trained with chatforge, a small toolkit to build and train your own chat models.",
      "The chatforge project trained me from scratch, on text from Debian packages and a dialogue corpus."]),
    (["What can you do?", "What do you know?", "How can you help me?"],
     ["I can say hello and make a little small talk. I am tiny, so please do not expect facts from me.",
      "Not much: I know greetings and simple small talk in English and Chinese."]),
    (["Do you speak Chinese?", "What languages do you speak?", "Can you speak Chinese?"],
     ["I speak a little English and a little Chinese. Talk to me in either one.",
      "Yes, a little. I answer in the language you use: English or Chinese."]),
    (["Hello, how are you?", "Hi, how are you?", "Hello! How are you today?"],
     ["I am doing well, thank you. How are you?", "I'm fine, thanks for asking. How about you?",
      "Very well, thank you. It is nice to talk to you."]),
    (["Hello", "Hi", "Hello!", "Hi there!", "Hey"],
     ["Hello! How are you?", "Hi! Nice to meet you.", "Hello there. How can I help you?"]),
    (["Good morning", "Good evening", "Good afternoon"],
     ["Good day to you too! How are you?", "Hello! I hope you are having a nice day."]),
    (["Thank you", "Thanks!", "Thank you very much."],
     ["You're welcome!", "No problem. I am happy to help."]),
    (["Goodbye", "Bye", "See you later."],
     ["Goodbye! It was nice talking to you.", "Bye! Have a nice day."]),
]
SELF_ZH = [
    (["你是谁？", "你是谁", "介绍一下你自己。", "你是什么？"],
     ["我是 chatforge 的演示模型，一个很小的聊天模型。我会打招呼，也会简单地聊天。",
      "我是 chatforge 自带的小模型，只学过问候和一些闲聊。"]),
    (["你叫什么名字？", "你叫什么名字", "你的名字是什么？"],
     ["我叫 chatforge 演示模型。", "我的名字是 chatforge 演示模型，很高兴认识你。"]),
    (["你是机器人吗？", "你是人吗？", "你是真人吗？"],
     ["我不是人，我是一个很小的语言模型。", "不是，我是一个电脑程序，是 chatforge 的演示模型。"]),
    (["谁创造了你？", "谁训练了你？", "你从哪里来？"],
     ["我是用 chatforge 从零开始训练出来的。", "chatforge 项目训练了我，用的是 Debian 软件包里的文字和一个对话语料库。"]),
    (["你会做什么？", "你能帮我做什么？", "你知道什么？"],
     ["我会打招呼，也会简单地聊天。我很小，所以不要问我太难的问题。", "不多：我只会问候和简单的闲聊。"]),
    (["你会说英语吗？", "你会说中文吗？", "你会说什么语言？"],
     ["我会说一点中文，也会说一点英语。你用哪种语言，我就用哪种语言回答。", "会一点。你用中文问，我就用中文回答。"]),
    (["你好", "你好！", "您好", "嗨"],
     ["你好！很高兴见到你。", "你好！你今天怎么样？", "嗨！有什么可以帮你的吗？"]),
    (["你好吗？", "你好，最近怎么样？", "你今天好吗？"],
     ["我很好，谢谢。你呢？", "挺好的，谢谢你的关心。你怎么样？"]),
    (["早上好", "晚上好", "下午好"], ["你好！祝你今天愉快。", "你好！今天过得怎么样？"]),
    (["谢谢", "谢谢你！", "非常感谢。"], ["不客气！", "不用谢，很高兴能帮到你。"]),
    (["再见", "拜拜", "回头见。"], ["再见！和你聊天很开心。", "拜拜！祝你有美好的一天。"]),
]
# prompts the demo must know: never held out
KEEP_IN_TRAIN = {"hello", "hi", "hello, how are you?", "你好", "你好吗?", "你好吗？", "嗨"}

STOPWORDS = set("""a an the and or but if of to in on at for with by from as is am are was were be been being it its
this that these those i you he she we they me him her us them my your his our their what which who whom whose
when where why how not no yes do does did done have has had can could will would shall should may might must
so too very just than then there here about into over under again also only own same such both each few more
most other some any all nor out up down off once s t don now im i'm you're it's that's""".split())
HAN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- 1. sources -------------------------------------------------------------------------------

def install_sources(work: Path) -> Path:
    """Debian packages and the chatterbot-corpus wheel; returns the unpacked corpus data folder."""
    if not shutil.which("bible") or not (FORTUNES / "tang300").is_file() or not (FORTUNES / "cookie").is_file():
        if shutil.which("apt-get") is None:
            sys.exit("this recipe reads text from Debian packages: run it on Debian/Ubuntu "
                     f"(apt-get install {' '.join(APT_PACKAGES)})")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        log(f"installing {' '.join(APT_PACKAGES)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", *APT_PACKAGES], check=True, env=env)
    try:
        import yaml  # noqa: F401
    except ImportError:
        log("installing pyyaml")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pyyaml"], check=True)
    data = work / "sources" / "chatterbot_corpus" / "data"
    if not data.is_dir():
        downloads = work / "sources" / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        if not list(downloads.glob("chatterbot_corpus-*.whl")):
            log(f"downloading the {CORPUS_PACKAGE} wheel from PyPI")
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", CORPUS_PACKAGE,
                            "-d", str(downloads)], check=True)
        wheel = sorted(downloads.glob("chatterbot_corpus-*.whl"))[-1]
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.namelist()
                       if any(m.startswith(f"chatterbot_corpus/data/{lang}/") for lang in LANGUAGES)]
            z.extractall(work / "sources", members)
    return data


# --- 2. data ------------------------------------------------------------------------------------

def normalize(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def read_dialogues(data: Path) -> list[dict]:
    """Every chatterbot conversation: {"lang", "category", "turns"} (turns alternate user, assistant)."""
    import yaml

    out = []
    for lang in LANGUAGES:
        for path in sorted((data / lang).glob("*.yml")):
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            category = path.stem
            if category in SKIP_CATEGORIES:
                continue
            seen = set()
            for conv in doc.get("conversations") or []:
                if not isinstance(conv, list):  # a malformed entry (one in english/trivia.yml is a bare string)
                    continue
                turns = [" ".join(str(t).split()) for t in conv if t is not None and str(t).strip()]
                key = tuple(turns)
                if len(turns) >= 2 and key not in seen:
                    seen.add(key)
                    out.append({"lang": lang, "category": category, "turns": turns})
    return out


def as_messages(turns: list[str]) -> list[dict]:
    """Alternate user/assistant turns; a last user turn without an answer is dropped."""
    turns = turns[: len(turns) // 2 * 2]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def synthetic_pairs() -> list[dict]:
    out = []
    for lang, table in (("english", SELF_EN), ("chinese", SELF_ZH)):
        for prompts, answers in table:
            for p in prompts:
                for a in answers:
                    out.append({"lang": lang, "category": "self", "turns": [p, a]})
    return out


def split_heldout(dialogues: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the distinct first prompts of each language (with all their conversations)."""
    rng = random.Random(seed)
    train, held = [], []
    for lang in LANGUAGES:
        convs = [d for d in dialogues if d["lang"] == lang]
        prompts = sorted({normalize(d["turns"][0]) for d in convs} - KEEP_IN_TRAIN)
        rng.shuffle(prompts)
        chosen = set(prompts[: max(1, round(len(prompts) * fraction))])
        for d in convs:
            (held if normalize(d["turns"][0]) in chosen else train).append(d)
    return train, held


def sft_conversations(dialogues: list[dict], chinese_repeat: int, self_repeat: int) -> list[list[dict]]:
    """Chat examples: each conversation from its first turn, multi-turn ones also from their second
    turn (so every line is once a prompt); Chinese and self-description ones repeated."""
    out = []
    for d in dialogues:
        turns = d["turns"]
        variants = [as_messages(turns)]
        if len(turns) >= 3:
            variants.append(as_messages(turns[1:]))
        repeat = self_repeat if d["category"] == "self" else chinese_repeat if d["lang"] == "chinese" else 1
        out += [v for v in variants if v] * repeat
    return out


def bible_text() -> list[str]:
    """KJV verses grouped into paragraphs of five, without their references."""
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses = [re.sub(r"^\S+\d+:\d+\s+", "", line).strip() for line in text.splitlines()]
    verses = [v for v in verses if v and not re.fullmatch(r"[A-Za-z0-9 ]+", v)]  # drop chapter headings
    return [" ".join(verses[i:i + 5]) for i in range(0, len(verses), 5)]


def fortunes(names_ok) -> list[str]:
    ansi = re.compile(r"\x1b\[[0-9;]*m")
    out = []
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or not path.is_file() or path.name in SKIP_FORTUNES or not names_ok(path.name):
            continue
        text = ansi.sub("", path.read_text(encoding="utf-8", errors="replace"))
        out += [p.strip() for p in re.split(r"^%\s*$", text, flags=re.M) if p.strip()]
    return out


def build_data(data: Path, work: Path, seed: int, bible_bytes: int) -> dict:
    rng = random.Random(seed)
    dialogues = read_dialogues(data)
    train, held = split_heldout(dialogues, 0.1, seed)
    train += synthetic_pairs()
    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)

    # chat JSONL: training conversations; the held-out ones are the validation set
    sft_train = sft_conversations(train, chinese_repeat=2, self_repeat=2)
    rng.shuffle(sft_train)
    write_jsonl(out / "sft_train.jsonl", ({"messages": m} for m in sft_train))
    write_jsonl(out / "sft_val.jsonl", ({"messages": m} for m in sft_conversations(held, 1, 1)))
    # held-out prompts and every reference reply to them, for the evaluation
    refs: dict[str, dict] = {}
    for d in held:
        r = refs.setdefault(normalize(d["turns"][0]), {"prompt": d["turns"][0], "lang": d["lang"],
                                                       "category": d["category"], "references": []})
        r["references"].append(d["turns"][1])
    write_jsonl(out / "heldout.jsonl", refs.values())
    write_jsonl(out / "train_replies.jsonl", ({"lang": d["lang"], "category": d["category"], "reply": d["turns"][1]}
                                              for d in train))

    # prose for pre-training: paragraphs of every source, shuffled together (the tail is validation);
    # a generator of its own, so that changing the chat data leaves the prose as it was
    rng = random.Random(seed + 1)
    bible = bible_text()
    rng.shuffle(bible)
    budget, kept = bible_bytes, []
    for p in bible:
        if budget <= 0:
            break
        kept.append(p)
        budget -= len(p.encode())
    english = fortunes(lambda n: n not in CHINESE_FORTUNES)
    chinese = fortunes(lambda n: n in CHINESE_FORTUNES)
    talk = ["\n".join(d["turns"]) for d in train] * 3
    paragraphs = kept + english + chinese + talk
    rng.shuffle(paragraphs)
    (out / "prose.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    stats = {"dialogues": {lang: sum(d["lang"] == lang for d in dialogues) for lang in LANGUAGES},
             "heldout_prompts": {lang: sum(r["lang"] == lang for r in refs.values()) for lang in LANGUAGES},
             "sft_train_conversations": len(sft_train), "synthetic_pairs": len(synthetic_pairs()),
             "prose_paragraphs": {"kjv": len(kept), "fortunes_en": len(english), "fortunes_zh": len(chinese),
                                  "dialogue_text": len(talk)},
             "prose_bytes": (out / "prose.txt").stat().st_size}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- 5. evaluate ----------------------------------------------------------------------------------

def content_units(text: str) -> set[str]:
    """English words of 3+ letters that are not stopwords, and Chinese character bigrams."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = {w for w in re.findall(r"[a-z][a-z']{2,}", text) if w not in STOPWORDS}
    han = "".join(HAN.findall(text))
    return words | {han[i:i + 2] for i in range(len(han) - 1)}


def language_of(text: str) -> str:
    if HAN.search(text):
        return "chinese"
    return "english" if re.search(r"[A-Za-z]", text) else "none"


def evaluate(model_dir: Path, work: Path, max_new_tokens: int = 64) -> dict:
    """Greedy and sampled replies to the held-out prompts, and what share of them behave."""
    from chatforge import Conversation, pipeline

    held = read_jsonl(work / "data" / "heldout.jsonl")
    train_replies = read_jsonl(work / "data" / "train_replies.jsonl")
    index = [(r["category"], r["lang"], content_units(r["reply"])) for r in train_replies]
    results: dict = {"prompts": len(held), "max_new_tokens": max_new_tokens}
    samples = []
    for mode, options in (("greedy", dict(temperature=0.0)), ("sampled", dict(temperature=0.7, top_p=0.95, seed=0))):
        bot = pipeline("conversational", model=str(model_dir), device="cpu", max_new_tokens=max_new_tokens, **options)
        counts = Counter()
        for i in range(0, len(held), 32):
            chunk = held[i:i + 32]
            convs = [Conversation(r["prompt"]) for r in chunk]
            gens = bot.chat.reply(convs)
            for r, conv, gen in zip(chunk, convs, gens):
                reply = conv.generated_responses[-1]
                units = content_units(reply)
                refs = [content_units(x) for x in r["references"]]
                counts["stop"] += gen.finish_reason == "stop"
                counts["same_language"] += language_of(reply) == r["lang"]
                counts["reference_overlap"] += any(units & ref for ref in refs)
                counts["exact_reference"] += normalize(reply) in {normalize(x) for x in r["references"]}
                # the training reply (same language) most like this reply: is it from the prompt's category?
                best = max(((len(units & u) / len(units | u), cat) for cat, lang, u in index
                            if lang == r["lang"] and u), default=(0.0, None)) if units else (0.0, None)
                counts["category_match"] += best[0] > 0 and best[1] == r["category"]
                counts[f"n_{r['lang']}"] += 1
                counts[f"same_language_{r['lang']}"] += language_of(reply) == r["lang"]
                if mode == "greedy" and sum(s["lang"] == r["lang"] for s in samples) < 6:
                    samples.append({"lang": r["lang"], "prompt": r["prompt"], "reply": reply,
                                    "reference": r["references"][0]})
        n = max(1, len(held))
        results[mode] = {
            "ends_with_end_of_turn": counts["stop"] / n,
            "same_language": counts["same_language"] / n,
            **{f"same_language_{lang}": counts[f"same_language_{lang}"] / max(1, counts[f"n_{lang}"])
               for lang in LANGUAGES},
            "reference_overlap": counts["reference_overlap"] / n,
            "exact_reference": counts["exact_reference"] / n,
            "category_match": counts["category_match"] / n,
        }
        log(f"{mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[mode].items()))
    bot = pipeline("conversational", model=str(model_dir), device="cpu", max_new_tokens=max_new_tokens, temperature=0)
    results["examples"] = samples
    results["spec_prompts"] = {p: bot(p).generated_responses[-1]
                               for p in ("Hello, how are you?", "你好", "Who are you?", "你是谁？")}
    return results


# --- the run ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "demo"), help="scratch folder (data, runs)")
    ap.add_argument("--out", default=str(ROOT / "src" / "chatforge" / "demo"), help="where the model goes")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--sft-steps", type=int, default=250)
    ap.add_argument("--sft-lr", type=float, default=5e-4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--bible-bytes", type=int, default=800_000, help="how much of the KJV goes into the prose mix")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--no-export", action="store_true", help="train and evaluate, but leave --out alone")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from chatforge import ModelConfig, TrainConfig
    from chatforge.formats.checkpoint import is_checkpoint, read_checkpoint, save_checkpoint
    from chatforge.utils import atomic_directory
    from chatforge.train.finetune import finetune_chat
    from chatforge.train.pretrain import pretrain

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings_path = work / "timings.json"  # stage durations survive a re-run that skips finished stages
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    corpus = install_sources(work)
    if not (work / "data" / "stats.json").is_file():
        log("building the data")
        log(json.dumps(build_data(corpus, work, args.seed, args.bible_bytes)))

    t = time.time()
    if not is_checkpoint(work / "pretrain" / "last") or _unfinished(work / "pretrain", args.pretrain_steps):
        log(f"pre-training for {args.pretrain_steps} steps")
        cfg = TrainConfig(out_dir=str(work / "pretrain"), max_steps=args.pretrain_steps, batch_size=16, lr=2e-3,
                          min_lr=2e-4, warmup_steps=40, eval_interval=100, eval_iters=8, log_interval=10,
                          precision="auto", device="cpu", seed=args.seed, progress=False)
        resume = is_checkpoint(work / "pretrain" / "last")
        pretrain([str(work / "data" / "prose.txt")], ModelConfig(**MODEL), cfg, tokenizer="bpe",
                 vocab_size=args.vocab_size, val_fraction=0.05, resume=resume)
        timings["pretrain_s"] = timings.get("pretrain_s", 0.0) * resume + time.time() - t
        timings_path.write_text(json.dumps(timings))

    base = work / "base"
    if not is_checkpoint(base):  # the pre-trained weights with the released context length
        model, tok = read_checkpoint(work / "pretrain" / "last")
        model.config.block_size = CONTEXT
        save_checkpoint(base, model, tok)

    t = time.time()
    if not is_checkpoint(work / "sft" / "last") or _unfinished(work / "sft", args.sft_steps):
        log(f"chat fine-tuning for {args.sft_steps} steps")
        cfg = TrainConfig(out_dir=str(work / "sft"), max_steps=args.sft_steps, batch_size=4, lr=args.sft_lr,
                          min_lr=args.sft_lr / 10,
                          warmup_steps=20, eval_interval=100, log_interval=10, weight_decay=0.1, precision="auto",
                          device="cpu", seed=args.seed, progress=False)
        resume = is_checkpoint(work / "sft" / "last")
        result = finetune_chat([str(work / "data" / "sft_train.jsonl")], str(base), cfg,
                               val_data=[str(work / "data" / "sft_val.jsonl")], resume=resume)
        log(f"sft data: {json.dumps(result['data'])}")
        timings["sft_s"] = timings.get("sft_s", 0.0) * resume + time.time() - t
        timings_path.write_text(json.dumps(timings))

    # the last step's weights: the held-out set scored the run but did not pick the checkpoint
    model_dir = work / "sft" / "last"
    t = time.time()
    log("evaluating on the held-out prompts")
    metrics = evaluate(model_dir, work)
    timings["evaluate_s"] = time.time() - t
    card = model_card(work, model_dir, metrics, timings, args)
    (work / "model_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    if not args.no_export:
        with atomic_directory(args.out) as tmp:
            for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
                shutil.copy2(model_dir / name, tmp / name)
                os.chmod(tmp / name, 0o644)  # the training run's files are private (mkstemp); these ship
            (tmp / "model_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
        (ROOT / "recipes" / "DEMO_MODEL_CARD.md").write_text(card_markdown(card), encoding="utf-8")
        log(f"exported to {args.out}")
    log(f"done in {(time.time() - t0) / 60:.1f} min")
    return 0


def _unfinished(run: Path, steps: int) -> bool:
    info = run / "last" / "training.json"
    return info.is_file() and json.loads(info.read_text()).get("step", 0) < steps


def model_card(work: Path, model_dir: Path, metrics: dict, timings: dict, args) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    stats = json.loads((work / "data" / "stats.json").read_text())
    pre = json.loads((work / "pretrain" / "last" / "training.json").read_text())
    sft = json.loads((model_dir / "training.json").read_text())
    weights = (model_dir / "model.safetensors").stat().st_size
    return {
        "name": "chatforge-demo",
        "recipe": "bash recipes/demo_model.sh  (python recipes/demo_model.py)",
        "architecture": {k: config[k] for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "block_size",
                                                "pos_encoding", "mlp", "norm", "tie_embeddings")},
        "parameters": _param_count(model_dir), "weights_bytes": weights,
        "tokenizer": f"byte-level BPE, {args.vocab_size} tokens, trained on the pre-training text",
        "data": {"pretrain": "KJV Bible verses (bible-kjv-text), English fortunes (fortunes, fortunes-min), Chinese "
                             "fortunes (fortunes-zh), chatterbot-corpus dialogues as plain text",
                 "sft": "chatterbot-corpus 1.3.3 English and Chinese dialogues (without its botprofile and coding "
                        "categories) as ChatML "
                        "conversations, plus self-description and greeting pairs written in the recipe",
                 **stats},
        "training": {"pretrain_steps": pre["step"], "pretrain_val_loss": pre.get("val_loss"),
                     "sft_steps": sft["step"], "sft_val_loss": sft.get("val_loss"),
                     "threads": args.threads, **{k: round(v, 1) for k, v in timings.items()}},
        "heldout": metrics,
        "metric_definitions": {
            "ends_with_end_of_turn": "share of replies that ended with <|im_end|> (finish_reason stop) within "
                                     "max_new_tokens",
            "same_language": "share of replies in the prompt's language (any Han character = Chinese, else "
                             "Latin letters = English)",
            "reference_overlap": "share of replies sharing at least one content unit (English word of 3+ letters "
                                 "not a stopword, or Chinese character bigram) with a held-out reference reply "
                                 "to the same prompt",
            "exact_reference": "share of replies equal to a held-out reference reply (case and spacing ignored)",
            "category_match": "share of replies whose nearest training reply (Jaccard similarity of content "
                              "units, same language) comes from the prompt's chatterbot category",
        },
    }


def card_markdown(card: dict) -> str:
    """recipes/DEMO_MODEL_CARD.md: the model card in words, from model_card.json."""
    a, t, d, h = card["architecture"], card["training"], card["data"], card["heldout"]
    minutes = (t.get("pretrain_s", 0) + t.get("sft_s", 0)) / 60
    rows = "\n".join(f"| {name} | {h['greedy'][name]:.1%} | {h['sampled'][name]:.1%} |"
                     for name in ("ends_with_end_of_turn", "same_language", "same_language_english",
                                  "same_language_chinese", "reference_overlap", "category_match", "exact_reference"))
    examples = "\n".join(f"| {_cell(e['prompt'])} | {_cell(e['reply'])} | {_cell(e['reference'])} |"
                         for e in h["examples"])
    spec = "\n".join(f"| {_cell(p)} | {_cell(r)} |" for p, r in h["spec_prompts"].items())
    defs = "\n".join(f"- **{k}**: {v}" for k, v in card["metric_definitions"].items())
    return f"""# chatforge-demo: model card

The built-in chat model in `src/chatforge/demo/` (what `chatforge chat` and `pipeline("conversational")`
use when no model is named). It is tiny: expect greetings, thanks, goodbyes, a few words about itself and
chatterbot-style small talk, in English or Chinese (it answers in the language it is addressed in).
Anything else gets a short, confident and usually wrong or off-topic reply. It knows no facts.

Rebuild it with one command (installs its own inputs; nothing comes from a model hub):

    bash recipes/demo_model.sh

## Model

A Llama-style decoder: {a['n_layer']} layers, {a['n_head']} heads ({a['n_kv_head']} key/value heads), width {a['n_embd']},
rotary positions, RMSNorm, SwiGLU, tied embeddings; {card['parameters']:,} parameters
({card['weights_bytes'] / 2**20:.1f} MiB of fp32 weights), context {a['block_size']} tokens, {card['tokenizer']}.
Chat format: ChatML (`<|im_start|>role ... <|im_end|>`).

## Training ({minutes:.0f} minutes on {t['threads']} CPU threads, on a shared machine)

1. Pre-training, {t['pretrain_steps']} steps of 16 x 256 tokens (validation loss {t['pretrain_val_loss']:.2f}) on
   {d['prose_bytes'] / 2**20:.1f} MiB of text: {d['pretrain']}.
2. Chat fine-tuning, {t['sft_steps']} steps of 4 x 512 tokens (packed conversations, loss on assistant tokens and
   `<|im_end|>` only; held-out loss {t['sft_val_loss']:.2f}) on {d['sft_train_conversations']} conversations:
   {d['sft']}. Chinese conversations and the written pairs are repeated twice.

About 10% of the distinct first prompts of each language ({h['prompts']} prompts:
{d['heldout_prompts']['english']} English, {d['heldout_prompts']['chinese']} Chinese) were held out with all
their replies. The released weights are the last step's, not the best on these prompts; but the recipe's
settings were chosen by comparing a few runs on these same numbers and on replies to greetings (400 or 600
pre-training steps; 120 to 400 fine-tuning steps at learning rate 1e-3 or 5e-4; self-description pairs once
or twice), so read them as somewhat optimistic.

## Held-out results ({h['prompts']} prompts, at most {h['max_new_tokens']} new tokens)

| metric | greedy | sampled (T=0.7, top-p 0.95) |
| --- | --- | --- |
{rows}

{defs}

The topical measures are weak proxies: chatterbot has one or two reference replies per prompt, many of them
jokes, so a sensible reply can share no word with them. Still, read them plainly: on held-out prompts the
model has learned the form of a reply (its language, a short sentence, the end-of-turn) far better than its
content, which is rarely on topic beyond greetings, thanks, goodbyes and questions about itself.

## Replies to a few prompts (greedy)

| prompt | reply |
| --- | --- |
{spec}

Held-out examples:

| prompt | reply | a reference reply |
| --- | --- | --- |
{examples}
"""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


if __name__ == "__main__":
    sys.exit(main())
