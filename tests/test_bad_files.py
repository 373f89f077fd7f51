"""A corpus of corrupt model files (checkpoints, configs, weights, tokenizers, GGUF, adapters, run
directories): each must end the command with one line on stderr that names the problem, a non-zero
exit, within 10 seconds (of CPU time) and under 1 GB of extra memory, and never a traceback.

Most cases call the CLI's main() in this process under an address-space limit (RLIMIT_AS: the
memory already mapped plus 1 GiB), so a case that tries to allocate more fails loudly instead of
passing; a handful run the real `chatforge` command in a subprocess, its peak memory measured.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from chatforge.cli import main
from conftest import make_chat_checkpoint

LIMIT_S = 10.0
EXTRA_MEMORY = 1 << 30  # bytes of address space a case may add


# --- the base files every case corrupts ---------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    from chatforge.config import ModelConfig
    from chatforge.export import export_hf
    from chatforge.loader import load
    from chatforge.model import Transformer

    root = tmp_path_factory.mktemp("bad-files")
    ckpt = make_chat_checkpoint(root / "ckpt")
    tok = load(str(ckpt))[1]
    llama = Transformer(ModelConfig.preset("test", vocab_size=tok.vocab_size, pos_encoding="rope", norm="rmsnorm",
                                           mlp="swiglu", bias=False))
    hf = export_hf(llama, root / "hf", tok)
    text = root / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"hi {i}", "completion": "hello"}) + "\n" for i in range(6)))
    return {"root": root, "ckpt": ckpt, "hf": hf, "text": text, "chats": chats}


def copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def config_with(**changes) -> Callable[[dict, Path], list[str]]:
    def make(b: dict, tmp: Path) -> list[str]:
        d = copy(b["ckpt"], tmp / "m")
        edit_json(d / "config.json", **changes)
        return generate(d)
    return make


def file_is(name: str, data: bytes, which: str = "ckpt") -> Callable[[dict, Path], list[str]]:
    def make(b: dict, tmp: Path) -> list[str]:
        d = copy(b[which], tmp / "m")
        target = d / name
        if target.is_dir():
            shutil.rmtree(target)
        target.write_bytes(data)
        return generate(d)
    return make


def raw_config(text: str) -> Callable[[dict, Path], list[str]]:
    return file_is("config.json", text.encode())


def generate(model: Path) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "1", "--device", "cpu"]


def safetensors_bytes(header: object, payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + payload


def truncated_weights(b: dict, tmp: Path) -> list[str]:
    d = copy(b["ckpt"], tmp / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])
    return generate(d)


def weights_of_another_model(b: dict, tmp: Path) -> list[str]:
    d = copy(b["ckpt"], tmp / "m")
    edit_json(d / "config.json", n_embd=64)  # the weights hold width 32
    return generate(d)


def missing(name: str, which: str = "ckpt") -> Callable[[dict, Path], list[str]]:
    def make(b: dict, tmp: Path) -> list[str]:
        d = copy(b[which], tmp / "m")
        (d / name).unlink()
        return generate(d)
    return make


def hf_config(**changes) -> Callable[[dict, Path], list[str]]:
    def make(b: dict, tmp: Path) -> list[str]:
        d = copy(b["hf"], tmp / "m")
        edit_json(d / "config.json", **changes)
        return generate(d)
    return make


def gguf_header(*, magic: bytes = b"GGUF", version: int = 3, tensors: int = 0, kvs: int = 0,
                tail: bytes = b"") -> bytes:
    return magic + struct.pack("<IQQ", version, tensors, kvs) + tail


def gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def gguf_kv(key: str, kind: int, value: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", kind) + value


def gguf_file(data: bytes, suffix: str = ".gguf") -> Callable[[dict, Path], list[str]]:
    def make(b: dict, tmp: Path) -> list[str]:
        path = tmp / f"model{suffix}"
        path.write_bytes(data)
        return generate(path)
    return make


ARCH = gguf_kv("general.architecture", 8, gguf_string("llama"))

# (name, builder): a builder makes the corrupt files under a fresh folder and returns the CLI arguments
CASES: list[tuple[str, Callable[[dict, Path], list[str]]]] = [
    # config.json: sizes, types, ranges
    ("n_layer a billion", config_with(n_layer=1_000_000_000)),
    ("n_embd a billion", config_with(n_embd=1_000_000_000)),
    ("n_embd as a float", config_with(n_embd=1e9)),
    ("vocab_size a trillion", config_with(vocab_size=10 ** 12)),
    ("block_size a trillion", config_with(block_size=10 ** 12, pos_encoding="learned")),
    ("n_head zero", config_with(n_head=0)),
    ("n_head not dividing n_embd", config_with(n_head=3)),
    ("negative dropout", config_with(dropout=-0.5)),
    ("dropout as text", config_with(dropout="abc")),
    ("bias as text", config_with(bias="yes")),
    ("local_layers as text", config_with(local_layers="all", sliding_window=4)),
    ("local_layers out of range", config_with(local_layers=[7], sliding_window=4)),
    ("rope_scaling factor zero", config_with(rope_scaling={"rope_type": "linear", "factor": 0})),
    ("unknown field", config_with(flux_capacitor=True)),
    ("model_type a list", config_with(model_type=[1, 2])),
    ("a config far larger than its weights", config_with(n_embd=131072, n_layer=64, vocab_size=1 << 24)),
    ("norm_eps NaN", raw_config('{"norm_eps": NaN, "vocab_size": 324}')),
    ("norm_eps Infinity", raw_config('{"norm_eps": Infinity}')),
    ("config a JSON array", raw_config("[1, 2, 3]")),
    ("config a JSON string", raw_config('"config"')),
    ("config binary bytes", file_is("config.json", bytes(range(256)) * 8)),
    ("config empty", raw_config("")),
    ("config truncated JSON", raw_config('{"n_layer": 2, "n_e')),
    ("config nested 100,000 deep", raw_config("[" * 100_000 + "]" * 100_000)),
    ("config with a 5,000-digit number", raw_config('{"n_layer": ' + "9" * 5000 + "}")),
    ("config latin-1 bytes", file_is("config.json", '{"labels": ["caf\xe9"]}'.encode("latin-1"))),
    ("config.json a folder", lambda b, tmp: (copy(b["ckpt"], tmp / "m"), (tmp / "m/config.json").unlink(),
                                             (tmp / "m/config.json").mkdir(), generate(tmp / "m"))[-1]),
    # weights
    ("weights truncated", truncated_weights),
    ("weights empty", file_is("model.safetensors", b"")),
    ("weights random bytes", file_is("model.safetensors", os.urandom(4096))),
    ("weights header claims 2^60 bytes", file_is("model.safetensors", struct.pack("<Q", 1 << 60) + b"{}")),
    ("weights header not JSON", file_is("model.safetensors", struct.pack("<Q", 8) + b"\xff" * 8)),
    ("weights header a list", file_is("model.safetensors", safetensors_bytes([1, 2]))),
    ("weights unknown dtype", file_is("model.safetensors", safetensors_bytes(
        {"wte.weight": {"dtype": "F99", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16)))),
    ("weights negative shape", file_is("model.safetensors", safetensors_bytes(
        {"wte.weight": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, bytes(16)))),
    ("weights of another shape", weights_of_another_model),
    ("weights missing", missing("model.safetensors")),
    ("weights a folder", lambda b, tmp: (copy(b["ckpt"], tmp / "m"), (tmp / "m/model.safetensors").unlink(),
                                         (tmp / "m/model.safetensors").mkdir(), generate(tmp / "m"))[-1]),
    # tokenizers
    ("tokenizer.json missing", missing("tokenizer.json")),
    ("tokenizer.json garbage", file_is("tokenizer.json", b"not a tokenizer at all")),
    ("tokenizer.json a JSON array", file_is("tokenizer.json", b"[1, 2, 3]")),
    ("tokenizer_config.json not UTF-8", file_is("tokenizer_config.json", b"\xff\xfe\x00{bad")),
    ("tokenizer_config.json a list", file_is("tokenizer_config.json", b'["chat_template"]')),
    ("chat_template a number", file_is("tokenizer_config.json", b'{"chat_template": 5}')),
    ("special tokens a list", file_is("tokenizer_config.json", b'{"chatforge_special_tokens": ["<|pad|>"]}')),
    # Hugging Face directories
    ("HF num_hidden_layers a billion", hf_config(num_hidden_layers=1_000_000_000)),
    ("HF hidden_size as text", hf_config(hidden_size="wide")),
    ("HF model_type unknown", hf_config(model_type="flux")),
    ("HF model_type a dict", hf_config(model_type={"a": 1})),
    ("HF rope_scaling a string", hf_config(rope_scaling="big")),
    ("HF num_attention_heads zero", hf_config(num_attention_heads=0)),
    ("HF shard index corrupt", lambda b, tmp: (copy(b["hf"], tmp / "m"), (tmp / "m/model.safetensors").unlink(),
                                               (tmp / "m/model.safetensors.index.json").write_text('{"weight_map": 3}'),
                                               generate(tmp / "m"))[-1]),
    ("HF shard index escaping the folder", lambda b, tmp: (
        copy(b["hf"], tmp / "m"), (tmp / "m/model.safetensors").unlink(),
        (tmp / "m/model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}'),
        generate(tmp / "m"))[-1]),
    # GGUF
    ("GGUF random bytes", gguf_file(b"GGUF" + os.urandom(2000))),
    ("GGUF bad magic", gguf_file(b"GGML" + bytes(100))),
    ("GGUF header only", gguf_file(b"GGUF")),
    ("GGUF claims 2^62 tensors", gguf_file(gguf_header(tensors=1 << 62))),
    ("GGUF claims 2^62 metadata keys", gguf_file(gguf_header(kvs=1 << 62))),
    ("GGUF string of 2^60 bytes", gguf_file(gguf_header(kvs=1, tail=struct.pack("<Q", 1 << 60) + b"key"))),
    ("GGUF unknown version", gguf_file(gguf_header(version=99))),
    ("GGUF no architecture", gguf_file(gguf_header())),
    ("GGUF unknown architecture", gguf_file(gguf_header(kvs=1, tail=gguf_kv(
        "general.architecture", 8, gguf_string("flux"))))),
    ("GGUF no tensors", gguf_file(gguf_header(kvs=1, tail=ARCH))),
    ("a file that is not a model", gguf_file(b"just some text\n", suffix=".bin")),
    # other verbs: eval, finetune, export, pretrain --init-from, adapters, resume
    ("eval: corrupt config", lambda b, tmp: ["eval", "--model", str(raw_config("[]")(b, tmp)[2]),
                                             "--data", str(b["text"])]),
    ("finetune: weights truncated", lambda b, tmp: ["finetune", "--model", truncated_weights(b, tmp)[2], "--data",
                                                    str(b["chats"]), "--out-dir", str(tmp / "run")]),
    ("export: n_layer a billion", lambda b, tmp: ["export", str(tmp / "out"), "--model",
                                                  config_with(n_layer=10 ** 9)(b, tmp)[2]]),
    ("pretrain --init-from a corrupt checkpoint", lambda b, tmp: [
        "pretrain", "--init-from", file_is("model.safetensors", b"\0" * 64)(b, tmp)[2], "--data", str(b["text"]),
        "--out-dir", str(tmp / "run")]),
    ("resume: trainer state corrupt", lambda b, tmp: (
        copy(b["ckpt"], tmp / "run/last"), (tmp / "run/last/trainer_state.json").write_text('{"__dict__": 5}'),
        (tmp / "run/last/trainer_state.safetensors").write_bytes(safetensors_bytes({})),
        ["pretrain", "--resume", "--out-dir", str(tmp / "run")])[-1]),
    ("resume: trainer state missing", lambda b, tmp: (
        copy(b["ckpt"], tmp / "run/last"), ["pretrain", "--resume", "--out-dir", str(tmp / "run")])[-1]),
    ("resume: finetune.json corrupt", lambda b, tmp: (
        copy(b["ckpt"], tmp / "run/last"), (tmp / "run/finetune.json").write_text('{"lora": {"rnk": 8}}'),
        ["finetune", "--resume", "--out-dir", str(tmp / "run")])[-1]),
]


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert len({name for name, _ in CASES}) == len(CASES)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run_limited(args: list[str], capsys) -> tuple[int, str, float]:
    """main(args) under RLIMIT_AS = what is mapped now + EXTRA_MEMORY; (exit status, stderr, CPU seconds).

    Time is CPU time (of every thread of this process), not wall time: the suite shares its cores with
    other work, which stretches wall time but not the work a hang or a runaway allocation does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    capsys.readouterr()
    resource.setrlimit(resource.RLIMIT_AS, (_status_kib("VmSize") * 1024 + EXTRA_MEMORY, hard))
    start = time.process_time()
    try:
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return code, capsys.readouterr().err, time.process_time() - start


@pytest.mark.parametrize("name,build", CASES, ids=[name for name, _ in CASES])
def test_a_corrupt_file_is_one_line_error(name, build, base, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHATFORGE_HOME", str(tmp_path / "home"))  # nothing of the user's cache
    args = build(base, tmp_path)
    code, err, seconds = run_limited(args, capsys)
    lines = err.strip().splitlines()
    assert code not in (0, None), f"{name}: exit {code}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith(f"chatforge {args[0]}: error: "), err
    assert "Traceback" not in err and "out of memory" not in err, err
    assert seconds < LIMIT_S, f"{name} took {seconds:.1f}s of CPU"


@pytest.mark.parametrize("which", ["ckpt", "hf"])
def test_a_model_larger_than_the_memory_is_refused_before_loading(which, base, capsys, monkeypatch):
    monkeypatch.setenv("CHATFORGE_MEMORY_LIMIT", "20kB")  # the tiny model's weights are ~100 kB
    code, err, _ = run_limited(generate(base[which]), capsys)
    assert code == 2
    assert "of weights, but only 20 kB of memory is available" in err and len(err.strip().splitlines()) == 1, err


def test_training_a_model_larger_than_the_memory_is_refused_before_building_it(base, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("CHATFORGE_MEMORY_LIMIT", "1GB")
    args = ["pretrain", "--data", str(base["text"]), "--out-dir", str(tmp_path / "run"), "--preset", "llama-1b",
            "--no-progress"]
    code, err, seconds = run_limited(args, capsys)
    assert code == 2 and "needs about" in err and "to train" in err and "only 1 GB" in err, err
    assert len(err.strip().splitlines()) == 1 and seconds < LIMIT_S


# a few through the real command: the process as a user runs it, its peak memory and CPU time measured
WRAPPER = ("import json, os, resource, sys\n"
           "from chatforge.cli import main\n"
           "try:\n    code = main(sys.argv[1:])\n"
           "finally:\n    use = resource.getrusage(resource.RUSAGE_SELF)\n"
           "    json.dump({'maxrss': use.ru_maxrss * 1024, 'cpu_s': use.ru_utime + use.ru_stime},\n"
           "              open(os.environ['USAGE_FILE'], 'w'))\n"
           "sys.exit(code)\n")


def run_real(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """The real `chatforge` command in a fresh process; (the process, its {maxrss, cpu_s})."""
    env = {**os.environ, "USAGE_FILE": str(tmp_path / "usage.json"), "CHATFORGE_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, timeout=120,
                          env=env)
    return proc, json.loads((tmp_path / "usage.json").read_text())


@pytest.mark.parametrize("name", ["n_layer a billion", "config binary bytes", "GGUF claims 2^62 tensors"])
def test_the_real_command_fails_in_one_line(name, base, tmp_path):
    build = dict(CASES)[name]
    proc, usage = run_real(build(base, tmp_path), tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("chatforge generate: error: "), proc.stderr
    assert usage["cpu_s"] < LIMIT_S and usage["maxrss"] < 1 << 30, usage
