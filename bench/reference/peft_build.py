"""The model, LoRA and optimizer as peft_lora_bench.py builds them, for the reference's wrappers
(peft_data_bench.py, peft_profile.py): a random Llama of the preset, optionally patched by
Liger-Kernel, with HF gradient checkpointing, peft LoRA (fp32 adapters) and fused AdamW."""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peft_lora_bench as base  # noqa: E402


def build(args, device):
    """(model, optimizer) for peft_lora_bench's parsed `args` on `device` (bf16 on cuda)."""
    import torch
    from peft import LoraConfig, get_peft_model
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    config = base.make_llama_config(base.resolve_model_cfg(args), args.attn)
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    model = base.build_model(config, dtype, device, args.attn)
    model.config.use_cache = False
    if args.grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    lcfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg, autocast_adapter_dtype=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=device == "cuda")
    return model, opt
