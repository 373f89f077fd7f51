"""Model-sizing advisor (`chatforge plan`): what a model needs, and what this machine can do with it.

    p = plan("1.3B")                          # a parameter count (a GPT-style shape is assumed)
    p = plan("gpt2-124m")                     # a preset
    p = plan("path/to/config.json")           # a chatforge or Hugging Face config.json (or its directory)
    p = plan("EleutherAI/gpt-neo-125m")       # a Hugging Face id: only its config.json is read (cache first)
    p = plan("llama-1b", gpu_gb=24, tflops=80, bandwidth_gbs=900)   # a stated machine instead of this one
    print(p.format()); json.dumps(p.to_dict())

Everything is arithmetic on the config; nothing is allocated. The rules:
- parameters: counted tensor by tensor, exactly as Transformer(config) holds them (a tied head once);
- load: parameters x bytes per parameter + a few MB (measured: module objects, file header, tokenizer),
  for weights stored in that dtype (converting while loading briefly holds both copies);
- full fine-tune: AdamW in mixed precision keeps fp32 weights, gradients and two moments (16 bytes per
  parameter), plus the activations the backward pass needs and the logits with their loss;
- LoRA: the frozen weights in the inference dtype, the adapters at 16 bytes per parameter, the same activations;
- generation (batch 1): every new token reads every weight once, so tokens/s is bandwidth / bytes of weights,
  or the matmul rate / 2N if slower, plus a fixed per-layer cost (kernel launches, Python);
- training: 6N FLOPs per token plus attention, at `mfu` (model FLOPs utilisation) of the matmul rate;
- compute-optimal pre-training (Chinchilla): about 20 tokens per parameter, 6·N·D FLOPs.
The matmul rates, memory bandwidth and per-layer cost come from about a second of calibration here
(chatforge.sizing.machine).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from chatforge.config import PRESETS, ModelConfig, count_params
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.sizing.machine import GB, Machine, describe_machine
from chatforge.train.memory import activation_bytes
from chatforge.utils import human_bytes

TOKENS_PER_PARAM = 20  # Chinchilla (Hoffmann et al., 2022)
# bytes per weight: int4 adds a bf16 scale and zero point per group of 64 weights
BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5 + 4 / 64}
# where chatforge's kernels decode (a CPU with them built), int8 and int4 are ggml's Q8_0 and Q4_1 blocks:
# 32 weights with an fp16 scale (and, Q4_1, an fp16 minimum)
KERNEL_BYTES = {"fp32": 4, "bf16": 2, "int8": 34 / 32, "int4": 20 / 32}
QUANTIZED = ("int8", "int4")  # weight-only: activations and the KV cache stay bf16 (fp32 without bf16)
HEADROOM = 0.9  # something fits when it needs at most 90% of the memory: the OS and allocator need the rest
LOAD_OVERHEAD = 5_000_000  # bytes beyond the weights when loading: measured 4.5-4.7 MB on CPU

# --- which model ---------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    name: str
    source: str  # "count" | "preset" | "chatforge config" | "<model_type> config"
    config: ModelConfig
    params: int
    shape_assumed: bool = False  # only a count was given: the shape is a typical one of that size


def parse_count(text: str) -> Optional[int]:
    """'125M' -> 125_000_000, '1.3B', '350k', '7e9', '124439808'; None when `text` is not a count."""
    m = re.fullmatch(r"\s*(\d*\.?\d+(?:e\d+)?)\s*([kmbgt]?)\s*", str(text).lower())
    if not m:
        return None
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2)]
    return int(round(float(m.group(1)) * scale))


def shape_for_params(n: int) -> ModelConfig:
    """A GPT-style shape of about `n` parameters: 12·L·C² + V·C = n, width about 64-128 times the
    depth (as in GPT-2, GPT-3 and Llama), heads of 64 (128 from 5B up)."""
    vocab = 50257 if n >= 100e6 else 32000 if n >= 20e6 else 8192 if n >= 2e6 else 512
    aspect = min(128.0, max(48.0, 64 * (n / 1e9) ** 0.25))
    head = 128 if n >= 5e9 else 64

    def width(layers: int) -> int:
        c = (-vocab + math.sqrt(vocab ** 2 + 48 * layers * n)) / (24 * layers)
        return max(head, head * round(c / head))

    layers = min(range(1, 160), key=lambda L: abs(math.log(width(L) / L / aspect)))
    C = width(layers)
    return ModelConfig(vocab_size=vocab, block_size=2048 if n >= 300e6 else 1024, n_layer=layers,
                       n_head=C // head, n_embd=C, mlp="gelu_tanh")


def config_from_dict(data: dict[str, Any]) -> tuple[ModelConfig, str]:
    """(ModelConfig, source) of a chatforge config or a Hugging Face config.json, as chatforge.formats.hf maps it."""
    from chatforge.formats.hf.families import FAMILIES, SUPPORTED

    kind = data.get("model_type", "chatforge")
    try:
        if kind == "chatforge":
            return ModelConfig.from_dict(data), "chatforge config"
        if kind not in FAMILIES:
            raise ChatforgeError(f"a {kind!r} config cannot be planned for; supported Hugging Face model types: "
                                 f"{', '.join(SUPPORTED)} (or give a parameter count such as 1.3B)")
        return FAMILIES[kind].to_config(data), f"{kind} config"
    except (ConfigError, TypeError) as e:
        raise ChatforgeError(f"not a valid {kind} config: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"cannot read {path} as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ChatforgeError(f"{path} does not hold a JSON object")
    return data


def hub_config(repo_id: str) -> dict[str, Any]:
    """config.json of a Hugging Face Hub model: from the local cache, else downloaded alone (no weights)."""
    from huggingface_hub import hf_hub_download

    from chatforge.formats.hf.hub import hub_cache_dir, offline

    for local_only in (True,) if offline() else (True, False):
        try:
            return _read_json(Path(hf_hub_download(repo_id, "config.json", cache_dir=hub_cache_dir(),
                                                   local_files_only=local_only)))
        except ChatforgeError:
            raise
        except Exception as e:  # not cached; then offline, no network, unknown or gated repo
            why = type(e).__name__
    raise ChatforgeError(f"cannot get config.json of {repo_id!r}: it is not in the Hugging Face cache "
                         f"({hub_cache_dir()}) and the download failed ({why}); pass a config.json path or a "
                         "parameter count instead")


def resolve_model(model: str | int | ModelConfig | dict) -> ModelSpec:
    """A parameter count, a preset name, a ModelConfig, a config dict, a config.json path (or its
    directory), or a Hugging Face id (owner/name)."""
    if isinstance(model, ModelConfig):
        return ModelSpec("config", "chatforge config", model, count_params(model))
    if isinstance(model, int) and not isinstance(model, bool):
        return _from_count(model, f"{model:,} parameters")
    if isinstance(model, dict):
        data, name = model, str(model.get("_name_or_path") or model.get("model_type") or "config")
    else:
        text = str(model).strip()
        path = Path(text).expanduser()
        if text in PRESETS:
            cfg = ModelConfig.preset(text)
            return ModelSpec(text, "preset", cfg, count_params(cfg))
        if path.is_dir() and (path / "config.json").is_file():
            data, name = _read_json(path / "config.json"), path.name
        elif path.is_file():
            data, name = _read_json(path), path.parent.name if path.name == "config.json" else path.name
        elif parse_count(text) is not None:
            return _from_count(parse_count(text), text)
        elif re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not path.exists():
            data, name = hub_config(text), text
        else:
            raise ChatforgeError(f"cannot read {text!r} as a model: give a parameter count (125M, 1.3B), a preset "
                                 f"({', '.join(PRESETS)}), a config.json path or a Hugging Face id")
    cfg, source = config_from_dict(data)
    return ModelSpec(name, source, cfg, count_params(cfg))


def _from_count(n: int, name: str) -> ModelSpec:
    if n < 1000:
        raise ChatforgeError(f"{n} parameters is too few for a Transformer; did you mean {n}M?")
    return ModelSpec(name, "count", shape_for_params(n), n, shape_assumed=True)


# --- parameters -----------------------------------------------------------------------------------

def lora_params(cfg: ModelConfig, rank: int) -> int:
    """Adapter parameters of chatforge.lora's default targets ("qkv" and every "proj": attention output
    and MLP down projection): rank x (inputs + outputs) per adapted linear."""
    C, q, kv, f = cfg.n_embd, cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head, cfg.ffn_dim
    return cfg.n_layer * rank * ((C + q + 2 * kv) + (q + C) + (f + C))


# --- memory ------------------------------------------------------------------------------------------

def load_bytes(params: int, dtype: str, per_weight: Optional[dict[str, float]] = None) -> int:
    return int(params * (per_weight or BYTES)[dtype]) + LOAD_OVERHEAD


def kv_cache_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int) -> int:
    return 2 * cfg.n_layer * cfg.kv_heads * cfg.dim_head * tokens * dtype_bytes


def finetune_memory(cfg: ModelConfig, params: int, batch: int, seq: int, bf16: bool, rank: int
                    ) -> dict[str, dict[str, float]]:
    """{"full" | "lora": {trainable, weights, gradients, optimizer, activations, total}} in bytes."""
    act = activation_bytes(cfg, batch, seq, 2 if bf16 else 4)
    adapters = lora_params(cfg, rank)
    full = {"trainable": params, "weights": 4.0 * params, "gradients": 4.0 * params, "optimizer": 8.0 * params,
            "activations": act}
    lora = {"trainable": adapters, "weights": (2.0 if bf16 else 4.0) * params + 4.0 * adapters,
            "gradients": 4.0 * adapters, "optimizer": 8.0 * adapters, "activations": act}
    for d in (full, lora):
        d["total"] = d["weights"] + d["gradients"] + d["optimizer"] + d["activations"]
    return {"full": full, "lora": lora}


def _kv_bytes(dtype: str, machine: Machine, kernels_used: bool = False) -> int:
    """Bytes per cached key/value element: the activations' dtype (a quantized model's is bf16 or fp32;
    fp32 where chatforge's kernels decode, which take fp32 rows)."""
    if dtype in QUANTIZED:
        return 2 if machine.bf16 and not kernels_used else 4
    return int(BYTES[dtype])


def decode_kernels(machine: Machine, check: bool = True) -> tuple[str, bool]:
    """(what multiplies a decoding step's rows on `machine`, whether it is chatforge's own kernels). On this
    CPU chatforge's GEMV over ggml blocks when they are built (checking may build them: about a second,
    once); check=False does not look and assumes torch's."""
    if machine.gpu_gb is not None:
        return "torch's (on the GPU)", False
    if not check:
        return "torch's (not checked)", False
    from chatforge import kernels

    if kernels.available():
        return f"chatforge's kernels ({kernels.status()}): int4 as Q4_1 blocks, int8 as Q8_0", True
    return f"torch's (chatforge's kernels {kernels.status()})", False


# --- speed -----------------------------------------------------------------------------------------------

def generation_tokens_per_s(cfg: ModelConfig, params: int, dtype: str, machine: Machine,
                            per_weight: Optional[dict[str, float]] = None) -> float:
    """Batch-1 decoding: each token reads every weight (but only one row of the embeddings it looks up)."""
    read = params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd)
    read -= cfg.block_size * cfg.n_embd if cfg.pos_encoding == "learned" else 0
    flops = machine.tflops_fp32 if dtype == "fp32" else machine.tflops_bf16
    seconds = max(read * (per_weight or BYTES)[dtype] / (machine.bandwidth_gbs * GB), 2.0 * params / (flops * 1e12))
    return 1.0 / (seconds + machine.step_overhead_s + cfg.n_layer * machine.layer_overhead_s)


def training_flops_per_token(cfg: ModelConfig, params: int, seq: int) -> float:
    """6N for the weights (forward + backward) + 6·L·T·d for the attention scores (Kaplan et al., 2020)."""
    return 6.0 * params + 6.0 * cfg.n_layer * seq * cfg.n_head * cfg.dim_head


# --- the plan ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    model: ModelSpec
    machine: Machine
    batch_size: int
    seq_len: int
    lora_rank: int
    mfu: float
    load: dict[str, dict[str, float]]  # fp32 | bf16 | int8 | int4 -> {bytes, fits, tokens_per_s, kv_cache_bytes_per_1k}
    finetune: dict[str, dict[str, float]]  # full | lora -> finetune_memory() + {fits, tokens_per_s}
    pretrain: dict[str, float]  # tokens, flops, seconds, tokens_per_s
    presets: list[dict[str, Any]]  # per preset: params and bytes to load / LoRA / fully fine-tune, fits
    recommend: dict[str, Optional[str]]  # inference | lora | full_finetune -> the largest preset that fits
    kernels: str = "torch's"  # what multiplies a decoding step's rows (decode_kernels)

    def to_dict(self) -> dict[str, Any]:
        return {"model": {**dataclasses.asdict(self.model), "config": self.model.config.to_dict()},
                "machine": {**dataclasses.asdict(self.machine), "memory_gb": self.machine.memory_gb},
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "machine")}}

    def format(self) -> str:
        return format_plan(self)


def _fits(nbytes: float, machine: Machine) -> bool:
    return nbytes <= machine.memory_gb * GB * HEADROOM


def plan(model: str | int | ModelConfig | dict, *, ram_gb: Optional[float] = None, gpu_gb: Optional[float] = None,
         tflops: Optional[float] = None, bandwidth_gbs: Optional[float] = None, batch_size: int = 8,
         seq_len: Optional[int] = None, lora_rank: int = 8, mfu: float = 0.4, measure: bool = True,
         machine: Optional[Machine] = None) -> Plan:
    """Size up `model` (see resolve_model) for this machine, or the one ram_gb / gpu_gb / tflops /
    bandwidth_gbs describe (or `machine`).

    batch_size, seq_len: the fine-tuning batch (seq_len None = the model's context, at most 2048).
    mfu: the fraction of the matmul rate training reaches. measure=False skips the calibration.
    """
    sizes = {"batch_size": batch_size, "lora_rank": lora_rank, **({} if seq_len is None else {"seq_len": seq_len})}
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ChatforgeError(f"{name} must be a positive integer, got {value!r}")
    if not 0 < mfu <= 1:
        raise ChatforgeError(f"mfu must be in (0, 1], got {mfu}")
    for name, value in (("ram_gb", ram_gb), ("gpu_gb", gpu_gb), ("tflops", tflops), ("bandwidth_gbs", bandwidth_gbs)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ChatforgeError(f"{name} must be a positive number, got {value!r}")
    spec = resolve_model(model)
    machine = machine or describe_machine(ram_gb=ram_gb, gpu_gb=gpu_gb, tflops=tflops, bandwidth_gbs=bandwidth_gbs,
                                          measure=measure)
    cfg, n = spec.config, spec.params
    seq = seq_len or min(cfg.block_size, 2048)

    kernels, ours = decode_kernels(machine, check=measure)
    per_weight = KERNEL_BYTES if ours else BYTES
    load = {dtype: {"bytes": load_bytes(n, dtype, per_weight), "fits": _fits(load_bytes(n, dtype, per_weight), machine),
                    "tokens_per_s": generation_tokens_per_s(cfg, n, dtype, machine, per_weight),
                    "kv_cache_bytes_per_1k": kv_cache_bytes(cfg, 1000, _kv_bytes(dtype, machine, ours))}
            for dtype in BYTES}

    train_rate = (machine.tflops_bf16 if machine.bf16 else machine.tflops_fp32) * 1e12 * mfu
    per_token = training_flops_per_token(cfg, n, seq)
    finetune = finetune_memory(cfg, n, batch_size, seq, machine.bf16, lora_rank)
    for kind, d in finetune.items():
        d["fits"] = _fits(d["total"], machine)
        # LoRA skips the weight gradients: a third of the matmuls of a training step
        d["tokens_per_s"] = train_rate / (per_token * (2 / 3 if kind == "lora" else 1))

    tokens = TOKENS_PER_PARAM * n
    pretrain = {"tokens": tokens, "flops": 6.0 * n * tokens, "seconds": per_token * tokens / train_rate,
                "tokens_per_s": train_rate / per_token}

    presets = []
    for name in PRESETS:
        pc = ModelConfig.preset(name)
        pn = count_params(pc)
        ft = finetune_memory(pc, pn, batch_size, min(seq_len or pc.block_size, pc.block_size, 2048),
                             machine.bf16, lora_rank)
        row = {"preset": name, "params": pn, "load_bytes": load_bytes(pn, "bf16" if machine.bf16 else "fp32"),
               "lora_bytes": ft["lora"]["total"], "full_bytes": ft["full"]["total"]}
        presets.append({**row, **{k.replace("bytes", "fits"): _fits(v, machine) for k, v in row.items()
                                  if k.endswith("bytes")}})
    recommend = {}
    for goal, key in (("inference", "load_fits"), ("lora", "lora_fits"), ("full_finetune", "full_fits")):
        fitting = [r for r in presets if r[key]]
        recommend[goal] = max(fitting, key=lambda r: r["params"])["preset"] if fitting else None
    return Plan(spec, machine, batch_size, seq, lora_rank, mfu, load, finetune, pretrain, presets, recommend, kernels)


# --- printing ------------------------------------------------------------------------------------------------

def _human(x: float, units: tuple[tuple[str, float], ...], fmt: str = "{:.3g}{}") -> str:
    for unit, size in units:
        if x >= size:
            return fmt.format(x / size, unit)
    return fmt.format(x, "")


def human_count(n: float) -> str:
    return _human(n, (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)))


def human_time(s: float) -> str:
    return _human(s, ((" years", 365.25 * 86400), (" days", 86400), (" h", 3600), (" min", 60)), "{:.3g}{}") \
        if s >= 60 else f"{s:.3g} s"


def _speed(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_plan(p: Plan) -> str:
    """The plan as the text `chatforge plan` prints."""
    spec, m, cfg = p.model, p.machine, p.model.config
    memory = f"GPU {m.gpu_gb:.3g} GB" if m.gpu_gb is not None else f"RAM {m.ram_gb:.3g} GB"
    how = "measured" if m.measured else "stated/assumed"
    lines = [
        f"model       {spec.name} ({spec.source})",
        f"parameters  {spec.params:,} ({human_count(spec.params)})",
        f"shape       {cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, vocabulary {cfg.vocab_size:,}, "
        f"context {cfg.block_size}" + ("  [assumed: only a count was given]" if spec.shape_assumed else ""),
        f"machine     {m.name}: {memory} (fits = at most {HEADROOM:.0%} of it); {m.tflops_fp32:.3g} TFLOP/s fp32, "
        f"{m.tflops_bf16:.3g} bf16, {m.bandwidth_gbs:.3g} GB/s ({how})",
        *[f"note        {note}" for note in m.notes],
        "",
        f"{'load and generate (batch 1)':<30}" + "".join(f"{d:>12}" for d in BYTES),
        f"{'  memory to load':<30}" + "".join(f"{human_bytes(p.load[d]['bytes']):>12}" for d in BYTES),
        f"{'  fits here':<30}" + "".join(f"{'yes' if p.load[d]['fits'] else 'no':>12}" for d in BYTES),
        f"{'  KV cache per 1k tokens':<30}" + "".join(f"{human_bytes(p.load[d]['kv_cache_bytes_per_1k']):>12}"
                                                       for d in BYTES),
        f"{'  generation tokens/s':<30}" + "".join(f"{_speed(p.load[d]['tokens_per_s']):>12}" for d in BYTES),
        f"{'':<30}each one's memory-bandwidth bound (docs/benchmarks.md, B2: the share reached)",
        f"{'  decoded by':<30}{p.kernels}",
        "",
        f"{f'fine-tune: batch {p.batch_size} x {p.seq_len} tokens, ' + ('bf16' if m.bf16 else 'fp32'):<50}"
        f"{'full':>12}{f'LoRA r={p.lora_rank}':>12}",
    ]
    full, lora = p.finetune["full"], p.finetune["lora"]
    for key, label in (("trainable", "trainable parameters"), ("weights", "weights"), ("gradients", "gradients"),
                       ("optimizer", "AdamW states"), ("activations", "activations + logits"), ("total", "total")):
        show = human_count if key == "trainable" else human_bytes
        lines.append(f"{'  ' + label:<50}{show(full[key]):>12}{show(lora[key]):>12}")
    lines += [f"{'  fits here':<50}{'yes' if full['fits'] else 'no':>12}{'yes' if lora['fits'] else 'no':>12}",
              f"{f'  training tokens/s (at {p.mfu:.0%} of the matmul rate)':<50}"
              f"{_speed(full['tokens_per_s']):>12}{_speed(lora['tokens_per_s']):>12}",
              "",
              f"compute-optimal pre-training ({TOKENS_PER_PARAM} tokens per parameter)",
              f"  tokens      {human_count(p.pretrain['tokens'])}",
              f"  compute     {p.pretrain['flops']:.3g} FLOPs (6·N·D)",
              f"  time here   {human_time(p.pretrain['seconds'])} at {_speed(p.pretrain['tokens_per_s'])} tokens/s",
              "",
              f"{'presets here':<16}{'parameters':>12}{'load':>14}{'LoRA':>14}{'full fine-tune':>16}"]
    for r in p.presets:
        cells = [f"{human_bytes(r[k + '_bytes'])} {'ok' if r[k + '_fits'] else '--'}" for k in ("load", "lora", "full")]
        lines.append(f"  {r['preset']:<14}{human_count(r['params']):>12}{cells[0]:>14}{cells[1]:>14}{cells[2]:>16}")
    lines += ["", "largest preset that fits here"]
    params = {r["preset"]: r["params"] for r in p.presets}
    for goal, label in (("inference", "to run"), ("lora", "to fine-tune with LoRA"),
                        ("full_finetune", "to fine-tune fully")):
        name = p.recommend[goal]
        lines.append(f"  {label:<24}{f'{name} ({human_count(params[name])})' if name else 'none'}")
    return "\n".join(lines)
