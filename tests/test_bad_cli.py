"""A corpus of bad `chatforge` invocations: mistyped flags, impossible values, data that is not text,
places that cannot be written, models that are not there. Each must end with exactly one line on
stderr (`chatforge VERB: error: ...`), a non-zero exit, within 10 seconds of CPU time and under 1 GB
of extra memory, and never a traceback or a page of usage.

Most run main() in this process under an address-space limit (RLIMIT_AS: what is mapped now plus
1 GiB); a handful run the real command in a subprocess.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_bad_files import LIMIT_S, run_limited, run_real

CLEAN = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * 60


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-cli")
    rng = __import__("random").Random(0)
    paths = {
        "text": root / "text.txt", "random": root / "random.bin", "nul": root / "nul.txt",
        "random_txt": root / "noise" / "a.txt", "latin1": root / "latin1.txt", "empty": root / "empty.txt",
        "a_file": root / "a-file", "bad_jsonl": root / "bad.jsonl", "random_jsonl": root / "random.jsonl",
        "random_csv": root / "random.csv", "chats": root / "chats.jsonl", "dbdir": root / "dbdir",
    }
    paths["random_txt"].parent.mkdir()
    paths["dbdir"].mkdir()
    paths["text"].write_text(CLEAN)
    paths["random"].write_bytes(bytes(rng.randrange(256) for _ in range(20_000)))
    paths["nul"].write_bytes(b"\0" * 20_000)
    paths["random_txt"].write_bytes(bytes(rng.randrange(1, 256) for _ in range(20_000)))  # no NUL byte
    paths["latin1"].write_bytes(("Caf\xe9 cr\xe8me br\xfbl\xe9e, \xe0 la fran\xe7aise. " * 200).encode("latin-1"))
    paths["empty"].write_text("")
    paths["a_file"].write_text("not a folder")
    paths["bad_jsonl"].write_text('{"prompt": "hi", "completion": "ho"}\n{"prompt": \n')
    paths["random_jsonl"].write_bytes(bytes(rng.randrange(256) for _ in range(20_000)))
    paths["random_csv"].write_bytes(bytes(rng.randrange(256) for _ in range(20_000)))
    paths["chats"].write_text("".join(json.dumps({"prompt": f"hi {i}", "completion": "hello"}) + "\n"
                                      for i in range(8)))
    return {k: str(v) for k, v in paths.items()} | {"root": str(root)}


def pretrain(f: dict, *extra: str) -> list[str]:
    return ["pretrain", "--data", f["text"], "--out-dir", f"{f['root']}/run-{len(extra)}-{abs(hash(extra))}",
            "--max-steps", "1", "--no-progress", *extra]


def finetune(f: dict, *extra: str) -> list[str]:
    return ["finetune", "--data", f["chats"], "--out-dir", f"{f['root']}/ft-{abs(hash(extra))}", "--max-steps", "1",
            "--no-progress", *extra]


DEMO = ["--model", "chatforge-demo"]

# (name, arguments from the fixture's files, what the error line must mention)
CASES = [
    # the flags themselves: argparse, one line each
    ("unknown verb", lambda f: ["fly"], "invalid choice"),
    ("unknown flag", lambda f: pretrain(f, "--warp-speed", "9"), "unrecognized arguments"),
    ("--lr abc", lambda f: pretrain(f, "--lr", "abc"), "--lr: invalid float value"),
    ("--max-steps 1.5", lambda f: pretrain(f, "--max-steps", "1.5"), "--max-steps: invalid int value"),
    ("--batch-size x", lambda f: pretrain(f, "--batch-size", "x"), "--batch-size"),
    ("--objective nope", lambda f: pretrain(f, "--objective", "nope"), "invalid choice"),
    ("--rope-scaling not JSON", lambda f: pretrain(f, "--rope-scaling", "{x"), "not valid JSON"),
    ("--task nope", lambda f: ["finetune", "--task", "nope"], "invalid choice"),
    ("--lora-rank abc", lambda f: finetune(f, "--lora-rank", "abc"), "--lora-rank"),
    ("generate without --model", lambda f: ["generate", "--prompt", "hi"], "--model"),
    ("generate --model without a value", lambda f: ["generate", "--model"], "expected one argument"),
    ("eval without --data", lambda f: ["eval", *DEMO], "--data"),
    ("export without OUT", lambda f: ["export"], "OUT"),
    ("serve --port abc", lambda f: ["serve", "--port", "abc"], "--port"),
    ("export --format nope", lambda f: ["export", f"{f['root']}/x", "--format", "nope"], "invalid choice"),
    # values the configs refuse
    ("--lr nan", lambda f: pretrain(f, "--lr", "nan"), "lr"),
    ("--lr inf", lambda f: pretrain(f, "--lr", "inf"), "lr must be a finite number"),
    ("--lr -1", lambda f: pretrain(f, "--lr", "-1"), "lr must be positive"),
    ("--batch-size 0", lambda f: pretrain(f, "--batch-size", "0"), "batch_size must be a positive integer"),
    ("--max-steps -5", lambda f: pretrain(f, "--max-steps", "-5"), "max_steps"),
    ("--warmup-steps -1", lambda f: pretrain(f, "--warmup-steps", "-1"), "warmup_steps"),
    ("--n-layer a billion", lambda f: pretrain(f, "--n-layer", "1000000000"), "n_layer is 1000000000"),
    ("--n-embd a billion", lambda f: pretrain(f, "--n-embd", "1000000000"), "n_embd is 1000000000"),
    ("--dropout 1.5", lambda f: pretrain(f, "--dropout", "1.5"), "dropout"),
    ("--norm-eps nan", lambda f: pretrain(f, "--norm-eps", "nan"), "norm_eps must be a finite number"),
    ("--seed 2^70", lambda f: pretrain(f, "--seed", str(2 ** 70)), "seed"),
    ("--val-fraction 2", lambda f: pretrain(f, "--val-fraction", "2"), "val_fraction"),
    ("--preset nope", lambda f: pretrain(f, "--preset", "nope"), "unknown preset"),
    ("--tokenizer nope", lambda f: pretrain(f, "--tokenizer", "nope"), "tokenizer"),
    ("--precision fp8", lambda f: pretrain(f, "--precision", "fp8"), "precision"),
    ("--schedule nope", lambda f: pretrain(f, "--schedule", "nope"), "schedule"),
    ("--device cuda without CUDA", lambda f: pretrain(f, "--device", "cuda:7" if not _cuda() else "tpu"), "device"),
    # places to write
    ("--out-dir under /proc", lambda f: pretrain(f, "--out-dir", "/proc/x"), "/proc/x"),
    ("--out-dir an existing file", lambda f: pretrain(f, "--out-dir", f["a_file"]), "is a file"),
    ("--out-dir under a file", lambda f: pretrain(f, "--out-dir", f["a_file"] + "/run"), "--out-dir"),
    ("--resume with nothing to resume", lambda f: pretrain(f, "--resume"), "nothing to resume"),
    # training data that is not (UTF-8) text
    ("--data missing", lambda f: ["pretrain", "--data", f["root"] + "/missing.txt"], "does not exist"),
    ("--data 20 KB of random bytes", lambda f: ["pretrain", "--data", f["random"], "--out-dir",
                                                f["root"] + "/r1"], "random.bin is not"),
    ("--data NUL bytes", lambda f: ["pretrain", "--data", f["nul"], "--out-dir", f["root"] + "/r2"], "NUL bytes"),
    ("--data a folder of random .txt", lambda f: ["pretrain", "--data", str(Path(f["random_txt"]).parent),
                                                  "--out-dir", f["root"] + "/r3"], "a.txt is not UTF-8"),
    ("--data latin-1 text", lambda f: ["pretrain", "--data", f["latin1"], "--out-dir", f["root"] + "/r4"],
     "latin1.txt is not UTF-8"),
    ("--data empty", lambda f: ["pretrain", "--data", f["empty"], "--out-dir", f["root"] + "/r5"], "empty"),
    ("mlm --data random bytes", lambda f: ["pretrain", "--objective", "mlm", "--data", f["random"], "--out-dir",
                                           f["root"] + "/r6"], "random.bin is not"),
    ("finetune --data invalid JSONL", lambda f: ["finetune", "--data", f["bad_jsonl"], "--out-dir",
                                                 f["root"] + "/f1"], "bad.jsonl:2"),
    ("finetune --data random bytes", lambda f: ["finetune", "--data", f["random_jsonl"], "--out-dir",
                                                f["root"] + "/f2"], "random.jsonl is not"),
    ("finetune classify --data random CSV", lambda f: ["finetune", "--task", "classify", "--data", f["random_csv"],
                                                       "--out-dir", f["root"] + "/f3"], "random.csv is not"),
    ("finetune --lora-rank a million", lambda f: finetune(f, "--lora-rank", "1000000"), "lora_rank"),
    ("finetune --block-size 0", lambda f: finetune(f, "--block-size", "0"), "block_size"),
    ("eval --data random bytes", lambda f: ["eval", *DEMO, "--data", f["random"]], "random.bin is not"),
    # models and generation settings
    ("generate --model missing", lambda f: ["generate", "--model", "/no/such/model", "--prompt", "hi"],
     "does not exist"),
    ("generate --max-new-tokens -1", lambda f: ["generate", *DEMO, "--prompt", "hi", "--max-new-tokens", "-1"],
     "max_new_tokens"),
    ("generate --temperature nan", lambda f: ["generate", *DEMO, "--prompt", "hi", "--temperature", "nan"],
     "temperature"),
    ("generate --dtype fp8", lambda f: ["generate", *DEMO, "--prompt", "hi", "--dtype", "fp8"], "dtype"),
    ("chat --model missing", lambda f: ["chat", "--model", "./no-such-dir"], "does not exist"),
    ("export --model missing", lambda f: ["export", f["root"] + "/x", "--model", "/no/model"], "does not exist"),
    ("serve --model missing", lambda f: ["serve", "--model", "/no/such/model", "--port", "0"], "does not exist"),
    ("serve --db a folder", lambda f: ["serve", *DEMO, "--db", f["dbdir"], "--port", "0"], "dbdir"),
    ("rm a model that is not there", lambda f: ["rm", "no-such-model"], "no-such-model"),
]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,make,mention", CASES, ids=[c[0] for c in CASES])
def test_a_bad_invocation_is_one_line_error(name, make, mention, files, capsys, monkeypatch):
    monkeypatch.setenv("CHATFORGE_HOME", files["root"] + "/home")
    args = make(files)
    code, err, seconds = run_limited(args, capsys)
    lines = err.strip().splitlines()
    assert code not in (0, None), f"{name}: exit {code}, stderr {err!r}"
    assert len(lines) == 1, f"{name}: {len(lines)} lines on stderr:\n{err}"
    verb = args[0] if args[0] in ("pretrain", "finetune", "generate", "eval", "export", "serve", "chat", "rm") else ""
    assert lines[0].startswith(f"chatforge {verb}: error: ".replace(" :", ":")), err
    assert mention in lines[0], f"{name}: {mention!r} not in {lines[0]!r}"
    assert "Traceback" not in err and "out of memory" not in err
    assert seconds < LIMIT_S, f"{name} took {seconds:.1f}s of CPU"


def test_a_step_that_cannot_fit_is_refused_before_it_starts(files, capsys, monkeypatch):
    """The memory estimate's refusal path, through the CLI: a limit far below what the step needs."""
    monkeypatch.setenv("CHATFORGE_MEMORY_LIMIT", "1MB")
    code, err, _ = run_limited(pretrain(files, "--preset", "test", "--batch-size", "64"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "one training step needs about" in err and "lower --batch-size" in err and "--grad-accum" in err, err
    run = Path(pretrain(files, "--preset", "test", "--batch-size", "64")[4])
    assert not (run / "last").exists() and not (run / "metrics.jsonl").exists()  # no step was taken


# a few through the real command: stdout must stay empty too (no banner before the error)
@pytest.mark.parametrize("name", ["--lr abc", "--data 20 KB of random bytes", "serve --model missing",
                                  "serve --db a folder"])
def test_the_real_command_fails_in_one_line(name, files, tmp_path):
    make, mention = {c[0]: c[1:] for c in CASES}[name]
    proc, usage = run_real(make(files), tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and mention in lines[0] and "error:" in lines[0], proc.stderr
    assert proc.stdout == "", proc.stdout
    assert usage["cpu_s"] < LIMIT_S and usage["maxrss"] < 1 << 30, usage
