#!/usr/bin/env python3
"""Reference for `just bench-generate` and bench/gpu.sh's generation rows: transformers generating
from the same model on the same machine.

A GGUF loads through transformers' own loader (dequantized to float32, the way it always loads
GGUF); a folder loads as it is (--dtype, --device). Then it times, like `loraforge generate
--json`: the prompt's forward pass (prefill, --batch copies of the prompt), and greedy decoding of
--max-tokens tokens with the KV cache, ignoring end-of-sequence. Prints one JSON line with the
same keys; with --batch the tokens/s count every row's tokens.
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quant", default="none", choices=["none", "nf4"],
                    help="nf4: the decoder's linears as bitsandbytes 4-bit NF4, computing in "
                         "--dtype (the head and embedding stay in --dtype); needs bitsandbytes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    load_start = time.perf_counter()
    if args.gguf.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(args.gguf))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    elif args.quant == "nf4":
        from transformers import BitsAndBytesConfig
        tok = AutoTokenizer.from_pretrained(args.gguf)
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(args.gguf, dtype=dtype,
                                                     quantization_config=nf4,
                                                     device_map=args.device)
    else:
        tok = AutoTokenizer.from_pretrained(args.gguf)
        model = AutoModelForCausalLM.from_pretrained(args.gguf, dtype=dtype)
    if args.quant == "none":
        model = model.to(args.device)
    model = model.eval()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    load_s = time.perf_counter() - load_start
    ids = tok(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    ids = ids.repeat(args.batch, 1).to(args.device)
    with torch.inference_mode():
        model(ids)  # warm-up, as our binary's first call also pays one-off costs
        sync()
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        sync()
        prompt_s = time.perf_counter() - start
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        generated = []
        start = time.perf_counter()
        for _ in range(args.max_tokens):
            generated.append(nxt)
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        gen_s = time.perf_counter() - start
        generated = [int(t) for t in torch.cat(generated, dim=1)[0]]
    print(json.dumps({
        "bench": "transformers_generate",
        "model": args.gguf,
        "device": args.device,
        "dtype": args.dtype,
        "quant": args.quant,
        "batch": args.batch,
        "threads": args.threads,
        "torch": torch.__version__,
        "load_s": load_s,
        "prompt_tokens": ids.shape[1],
        "prompt_tps": ids.numel() / prompt_s,
        "generation_tokens": len(generated),
        "generation_tps": args.batch * len(generated) / gen_s,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "ids": generated,
    }))


if __name__ == "__main__":
    main()
