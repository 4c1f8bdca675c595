#!/usr/bin/env python3
"""A random Llama-3-8B-shaped Hugging Face folder in bf16, for the generation rows of bench/gpu.sh.

transformers builds the model from a config on the GPU (random init there is seconds), and
save_pretrained writes it as safetensors shards; the Llama 3 tokenizer files are copied in. Both
loraforge and transformers then load the same folder.

Usage: make_random_llama.py OUT_DIR TOKENIZER_DIR [--layers N]
"""
import argparse
import os
import shutil

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("tokenizer")
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Default init gives std 0.02 everywhere: logits stay finite and the argmax varies.
    tmp = args.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.tokenizer, name), tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
