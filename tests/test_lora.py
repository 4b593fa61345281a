"""LoRA against peft, the independent reference: our adapters load into peft's PeftModel with our logits, peft's
adapters load into ours with its logits, and merging an adapter into the base changes no output."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lora_io_draft import adapter_config, load_adapter, save_adapter
from model import LORA_TARGETS, apply_lora, load_model, merge_lora

TARGET_SETS = [["q_proj", "v_proj"], list(LORA_TARGETS)]


def reference(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def trained_looking(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every adapter: B starts at zero, which would make any base-only model pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["q_v", "all"])
def test_our_adapter_loads_into_peft_with_our_logits(tiny_model, tmp_path, targets):
    ours = load_model(tiny_model)
    apply_lora(ours, r=4, alpha=8, dropout=0.0, targets=targets)
    trained_looking(ours)
    save_adapter(str(tmp_path), adapter_config(4, 8, 0.0, targets, tiny_model), ours.named_parameters())

    theirs = PeftModel.from_pretrained(reference(tiny_model), str(tmp_path)).eval()
    with torch.no_grad():
        assert (ours(tokens()) - theirs(tokens()).logits).abs().max() <= 1e-5
    # Every adapter tensor was taken: peft's own names for the loaded weights match ours one to one.
    peft_names = {n.replace(".default", "") for n, _ in theirs.named_parameters() if ".lora_" in n}
    assert peft_names == {"base_model.model.model." + n for n, _ in ours.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("targets", TARGET_SETS, ids=["q_v", "all"])
def test_peft_adapter_loads_into_ours_with_its_logits(tiny_model, tmp_path, targets):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules=targets, init_lora_weights=False)
    theirs = get_peft_model(reference(tiny_model), config).eval()  # init_lora_weights=False: B is random too
    theirs.save_pretrained(tmp_path)

    ours = load_model(tiny_model)
    load_adapter(ours, str(tmp_path))
    with torch.no_grad():
        assert (ours(tokens()) - theirs(tokens()).logits).abs().max() <= 1e-5


def test_merged_equals_unmerged(tiny_model):
    ours = load_model(tiny_model)
    apply_lora(ours, r=8, alpha=16, dropout=0.05, targets=LORA_TARGETS)
    trained_looking(ours)
    ours.eval()
    with torch.no_grad():
        unmerged = ours(tokens())
        merge_lora(ours)
        merged = ours(tokens())
    assert not any(".lora_" in n for n, _ in ours.named_parameters())
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (merged - load_model(tiny_model)(tokens())).abs().max() > 1e-2  # the adapters did change the model


def test_adapter_for_another_base_is_one_clear_error(tiny_model, tmp_path):
    ours = load_model(tiny_model)
    apply_lora(ours, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    adapters = [
        (n, torch.cat([p, p], dim=-1) if n.endswith("lora_A.weight") else p) for n, p in ours.named_parameters()
    ]
    save_adapter(str(tmp_path), adapter_config(4, 8, 0.0, ["q_proj", "v_proj"], "other"), adapters)
    with pytest.raises(
        ValueError,
        match=r"adapter_model.safetensors: tensor 'base_model.model.model.layers.0.self_at"
        r"tn.q_proj.lora_A.weight' has shape \(4, 128\) but the base model expects \(4, 64\)",
    ):
        load_adapter(load_model(tiny_model), str(tmp_path))


def test_unknown_target_module_is_one_clear_error(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA target module 'qproj'"):
        apply_lora(load_model(tiny_model), r=4, alpha=8, dropout=0.0, targets=["qproj"])
    ours = load_model(tiny_model)
    apply_lora(ours, r=4, alpha=8, dropout=0.0, targets=["q_proj"])
    save_adapter(str(tmp_path), adapter_config(4, 8, 0.0, ["q_proj", "lm_head"], "base"), ours.named_parameters())
    with pytest.raises(ValueError, match="adapter_config.json: target_modules must be a list of q_proj"):
        load_adapter(load_model(tiny_model), str(tmp_path))
