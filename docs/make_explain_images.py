"""Rebuild the README's explain/report/plan examples (docs/images/*.png) with the built-in demo model.

    python docs/make_explain_images.py            # a few minutes on 2 CPU cores

1. explain_attention.png   `chatforge explain --chat --mode tokens`: the attention of a generated reply
2. explain_logit_lens.png  `chatforge explain --mode lens`
3. report_loss.png         `chatforge report` of a short chat fine-tuning of the demo model on 40 made-up
                           facts (30 to train on, 10 held out): it memorises the training facts, and the
                           report flags where the validation loss turned
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
CITIES = "Amber Birch Cobalt Dune Ember Fern Granite Harbor Iris Juniper".split()
THINGS = [("river", "flows"), ("tower", "stands"), ("market", "opens"), ("bridge", "sways")]


def chatforge(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "chatforge.cli", *args], capture_output=True, text=True, check=True)
    print(out.stdout)
    return out.stdout


def facts_jsonl(path: Path) -> None:
    """40 question/answer pairs no model can know: only memorising them lowers their loss."""
    rng = random.Random(0)
    lines = []
    for city in CITIES:
        for thing, verb in THINGS:
            colour = rng.choice(["red", "green", "blue", "gold", "grey", "white"])
            hour = rng.randint(1, 12)
            lines.append({"messages": [
                {"role": "user", "content": f"Tell me about the {thing} of {city}."},
                {"role": "assistant", "content": f"The {colour} {thing} of {city} {verb} at {hour} o'clock."}]})
    rng.shuffle(lines)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    chatforge("explain", "--mode", "tokens", "--chat", "--text", "What can you do?", "--max-new-tokens", "12",
              "--out", str(IMAGES / "explain_attention.png"))
    chatforge("explain", "--mode", "lens", "--text", "The Lord is my shepherd; I shall not want.",
              "--out", str(IMAGES / "explain_logit_lens.png"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "facts.jsonl"
        facts_jsonl(data)
        run = Path(tmp) / "run"
        chatforge("finetune", "--task", "chat", "--data", str(data), "--val-fraction", "0.25",
                  "--out-dir", str(run), "--max-steps", "60", "--batch-size", "8", "--lr", "1e-3",
                  "--warmup-steps", "5", "--eval-interval", "5", "--eval-iters", "4", "--log-interval", "5",
                  "--no-progress", "--precision", "fp32", "--device", "cpu")
        chatforge("report", str(run), "--png-dir", str(Path(tmp) / "png"))
        shutil.copy(Path(tmp) / "png" / "loss.png", IMAGES / "report_loss.png")


if __name__ == "__main__":
    main()
