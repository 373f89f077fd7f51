"""LoRA adapters: exact merging, frozen base weights, target selection, adapter files."""
from __future__ import annotations

import pytest
import torch

from chatforge.formats.checkpoint import WEIGHTS, read_weights
from chatforge.config import ModelConfig
from chatforge.errors import ConfigError
from chatforge.loader import load
from chatforge.export import save_adapter
from chatforge.loader import load_adapter
from chatforge.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers, merge_lora, split_state
from chatforge.model import Transformer


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("test", pos_encoding="rope", mlp="swiglu", norm="rmsnorm", n_kv_head=1, **kw)
    return Transformer(cfg).eval()


def randomize_adapters(model) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.5)


def test_merging_gives_the_same_logits_as_the_adapters():
    model = tiny_model()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        base = model(x)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["qkv", "proj", "fc"]))
    with torch.no_grad():
        assert torch.allclose(model(x), base)  # B = 0: training starts from the base model
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(x)
        assert not torch.allclose(adapted, base, atol=1e-3)
        merge_lora(model)
        merged = model(x)
    assert not lora_layers(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "proj", "fc")))
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=1e-4)
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # a plain model's weights again


def test_targets_pick_layers_by_name_and_only_adapters_train():
    model = tiny_model()
    names = apply_lora(model, LoRAConfig(rank=2, targets=["qkv", "mlp.proj"]))
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.proj", "blocks.1.attn.qkv", "blocks.1.mlp.proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    with pytest.raises(ConfigError, match="match no linear layer.*choose from"):
        apply_lora(tiny_model(), LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ConfigError, match="lora_rank"):
        LoRAConfig(rank=0)
    # the output head (tied to the embeddings) is never adapted, even by a full name
    with pytest.raises(ConfigError):
        apply_lora(tiny_model(), LoRAConfig(targets=["lm_head"]))


def test_adapter_files_round_trip(tmp_path):
    model = tiny_model()
    config = LoRAConfig(rank=3, alpha=6, targets=["fc"])
    apply_lora(model, config)
    randomize_adapters(model)
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        want = model(x)
    save_adapter(tmp_path / "adapter", model, config, base_model="base")
    fresh = tiny_model()
    assert load_adapter(fresh, tmp_path / "adapter") == config
    with torch.no_grad():
        assert torch.allclose(fresh(x), want, atol=1e-6)
    assert isinstance(fresh.blocks[0].mlp.fc, LoRALinear)


def test_lora_finetune_trains_only_adapters_and_saves_a_merged_checkpoint(tmp_path, chat_model_dir, one_thread):
    from chatforge.train.finetune import finetune_chat
    from test_sft import CONVERSATIONS, tiny_config, write

    data = write(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 8)
    result = finetune_chat([str(data)], str(chat_model_dir), tiny_config(tmp_path / "run", max_steps=8, eval_interval=4),
                           lora_rank=4, lora_alpha=8, lora_targets=["qkv", "fc"])
    base = read_weights(chat_model_dir / WEIGHTS)
    trained, adapters = split_state(read_weights(tmp_path / "run" / "last" / WEIGHTS))
    assert set(trained) == set(base)
    assert all(torch.equal(trained[k], base[k]) for k in base)  # the base weights did not move
    assert adapters and any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in adapters.items())
    # merged/ is a normal checkpoint whose weights differ from the base only where adapters were
    assert result["model_dir"] == str(tmp_path / "run" / "merged")
    merged, tok = load(result["model_dir"])
    assert tok.chat_template
    changed = {k for k, v in merged.state_dict().items() if k in base and not torch.equal(v, base[k])}
    assert changed and all(k.endswith(("attn.qkv.weight", "mlp.fc.weight")) for k in changed)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
