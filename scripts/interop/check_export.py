"""Reads loraforge's exports with the reference tools and prints what they compute, as JSON.

    check_export.py mlx-generate DIR IDS_JSON MAX_TOKENS   greedy token ids per prompt (mlx_lm)
    check_export.py mlx-logits DIR IDS_JSON                last-position logits (mlx_lm)
    check_export.py hf-logits DIR IDS_JSON                 logits of every position (transformers)
    check_export.py peft-logits BASE ADAPTER IDS_JSON      base + PEFT adapter (transformers, peft)
    check_export.py gguf-logits FILE IDS_JSON              transformers' GGUF loader
    check_export.py gguf-read FILE                         tensor names, types, shapes (gguf package)

IDS_JSON is a JSON list of prompts, each a list of token ids. Only the tool a command needs is
imported, so the mlx commands run without torch.
"""
import json
import sys


def mlx_generate(path, prompts, max_tokens):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(path)
    out = []
    for ids in prompts:
        tokens = []
        sampler = lambda logits: mx.argmax(logits, axis=-1)
        for token, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens, sampler=sampler):
            tokens.append(int(token))
        out.append(tokens)
    return out


def mlx_logits(path, prompts):
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(path)
    return [model(mx.array([ids]))[0].astype(mx.float32).tolist() for ids in prompts]


def torch_logits(model, prompts):
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().tolist() for ids in prompts]


def hf_logits(path, prompts):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return torch_logits(model.eval(), prompts)


def peft_logits(base, adapter, prompts):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base.endswith(".gguf"):
        import os

        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(base), gguf_file=os.path.basename(base), dtype=torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    return torch_logits(model.eval(), prompts)


def gguf_logits(file, prompts):
    import os

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(file), gguf_file=os.path.basename(file), dtype=torch.float32
    )
    return torch_logits(model.eval(), prompts)


def gguf_read(file):
    from gguf import GGUFReader

    reader = GGUFReader(file)
    return {
        "architecture": bytes(reader.fields["general.architecture"].parts[-1]).decode(),
        "tensors": [
            {"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape]}
            for t in reader.tensors
        ],
    }


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    load_ids = lambda p: json.load(open(p))
    if cmd == "mlx-generate":
        result = mlx_generate(args[0], load_ids(args[1]), int(args[2]))
    elif cmd == "mlx-logits":
        result = mlx_logits(args[0], load_ids(args[1]))
    elif cmd == "hf-logits":
        result = hf_logits(args[0], load_ids(args[1]))
    elif cmd == "peft-logits":
        result = peft_logits(args[0], args[1], load_ids(args[2]))
    elif cmd == "gguf-logits":
        result = gguf_logits(args[0], load_ids(args[1]))
    elif cmd == "gguf-read":
        result = gguf_read(args[0])
    else:
        sys.exit(f"unknown command {cmd!r}\n{__doc__}")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
