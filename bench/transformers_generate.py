#!/usr/bin/env python3
"""Reference for `just bench-generate`: transformers generating from the same GGUF on the same CPU.

Loads the GGUF with transformers' own loader (dequantized to float32, the way it always loads
GGUF), then times, like `loraforge generate --json`: the prompt's forward pass (prefill), and
greedy decoding of --max-tokens tokens with the KV cache, ignoring end-of-sequence. Prints one
JSON line with the same keys.
"""
import argparse
import json
import os
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        model(ids)  # warm-up, as our binary's first call also pays one-off costs
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        prompt_s = time.perf_counter() - start
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        generated = []
        start = time.perf_counter()
        for _ in range(args.max_tokens):
            generated.append(int(nxt))
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        gen_s = time.perf_counter() - start
    print(json.dumps({
        "bench": "transformers_generate",
        "model": args.gguf,
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "prompt_tokens": ids.shape[1],
        "prompt_tps": ids.shape[1] / prompt_s,
        "generation_tokens": len(generated),
        "generation_tps": len(generated) / gen_s,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "ids": generated,
    }))


if __name__ == "__main__":
    main()
