"""What fastmtt reads of a (PEFT) causal LM besides its head: the decoder stack and the adapters' modules."""
import torch


def decoder_of(causal_lm):
    """The causal LM's decoder stack (returns final hidden states, after the final norm)."""
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    if decoder is None or decoder is causal_lm:
        decoder = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", ""), None)
    if not isinstance(decoder, torch.nn.Module):
        raise TypeError(f"cannot find the decoder of {type(causal_lm).__name__} (no get_decoder() or "
                        "base_model_prefix submodule)")
    return decoder


def adapter_modules(model):
    """Every module inside the adapters of `model`'s PEFT tuner layers (LoRA's lora_A, lora_B, lora_dropout, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names + module.other_param_names:
                container = getattr(module, name, None)
                if isinstance(container, torch.nn.Module):
                    yield from container.modules()
