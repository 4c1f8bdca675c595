#!/usr/bin/env python3
"""PyTorch + peft on real data, padded: the reference for `loraforge bench train --data`.

Reads the examples that `loraforge bench train --data ... --examples-out FILE` wrote (token ids
and loss masks, one JSON line each, so both sides train on the same tokens), shuffles them with
the seed and cuts them into batches of --batch examples padded to the longest of each (right
padding, attention_mask 0, labels -100 on padding and prompts): what transformers'
DataCollatorForSeq2Seq and LLaMA-Factory do by default. The model and LoRA are built as
peft_lora_bench.py builds them (peft_build.py) (its flags: --preset, --rank, --alpha, --targets,
--grad-checkpoint, --liger, ...). tokens/s counts the positions that are not padding over all
timed steps, n - 1 for an example of n tokens (the positions with a target), as ours does.

    python3 bench/reference/peft_data_bench.py --examples ex.jsonl --preset llama3.2-1b \\
        --batch 8 --steps 40 --warmup-steps 5 --targets all-linear --rank 16 --alpha 32
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peft_build  # noqa: E402
import peft_lora_bench as base  # noqa: E402


def main():
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--examples", required=True, help="JSON Lines of {ids, trained}")
    ours, rest = own.parse_known_args()
    args = base.parse_args(rest)
    import torch

    examples = []
    with open(ours.examples) as f:
        for line in f:
            e = json.loads(line)
            examples.append((e["ids"], e["trained"]))
    longest = max(len(ids) for ids, _ in examples)
    args.seq = longest  # the model's max_position_embeddings must reach the longest example
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)
    batches = [order[i:i + args.batch] for i in range(0, len(order) - args.batch + 1, args.batch)]
    needed = args.warmup_steps + args.steps
    if needed > len(batches):
        raise SystemExit(f"{needed} steps need {needed} batches; the examples give {len(batches)}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt = peft_build.build(args, device)

    def collate(members):
        width = max(len(examples[i][0]) for i in members)
        ids = torch.zeros(len(members), width, dtype=torch.long)
        attention = torch.zeros(len(members), width, dtype=torch.long)
        labels = torch.full((len(members), width), -100, dtype=torch.long)
        positions = 0
        for row, i in enumerate(members):
            tokens, trained = examples[i]
            n = len(tokens)
            ids[row, :n] = torch.tensor(tokens)
            attention[row, :n] = 1
            labels[row, :n] = torch.tensor([t if m else -100 for t, m in zip(tokens, trained)])
            positions += n - 1
        trained_targets = int((labels[:, 1:] != -100).sum())
        return ids.to(device), attention.to(device), labels.to(device), positions, trained_targets

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    tokens = trained_tokens = 0
    for step in range(needed):
        ids, attention, labels, positions, trained = collate(batches[step])
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach().float()))
        if step >= args.warmup_steps:
            times.append(dt)
            tokens += positions
            trained_tokens += trained
        print(f"   step {step:3d} [{'meas' if step >= args.warmup_steps else 'warm'}] "
              f"{dt * 1e3:9.2f} ms  {ids.shape[0]} x {ids.shape[1]}  loss {losses[-1]:.4f}",
              file=sys.stderr, flush=True)

    timed = sum(times)
    padded_positions = sum(
        len(batches[s]) * max(len(examples[i][0]) - 1 for i in batches[s])
        for s in range(args.warmup_steps, needed))
    result = {
        "bench": "peft_data_bench", "tag": args.tag, "argv": sys.argv[1:],
        "settings": {"preset": args.preset, "batch": args.batch, "steps": args.steps,
                     "warmup_steps": args.warmup_steps, "grad_checkpoint": args.grad_checkpoint,
                     "liger": args.liger, "rank": args.rank, "alpha": args.alpha,
                     "targets": args.targets, "examples": len(examples),
                     "padding": "each batch to its longest example (right)"},
        "results": {
            "tokens_per_s": tokens / timed, "trained_tokens_per_s": trained_tokens / timed,
            "timed_tokens": tokens, "timed_trained_tokens": trained_tokens, "timed_s": timed,
            "padding_fraction_of_timed": 1 - tokens / padded_positions,
            "loss_first": losses[0], "loss_last": losses[-1],
            "tokens_kind": "input positions that are not padding, over all timed steps",
        },
    }
    if device == "cuda":
        result["results"]["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["results"]["gpu_name"] = torch.cuda.get_device_name(0)
    line = json.dumps(result)
    print(line, flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
