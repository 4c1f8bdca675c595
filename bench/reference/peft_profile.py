#!/usr/bin/env python3
"""Where peft (+ Liger with --liger) spends a training step on the GPU: torch.profiler over
--steps steps after --warmup-steps, on random batches as peft_lora_bench.py times them (its
flags). Prints each CUDA kernel's total time per step, largest first, and the totals of a few
groups (GEMMs, attention, Triton kernels, element-wise, reductions, copies, other), so the
reference's step can be set beside ours kernel by kernel (bench/NOTES.md).

    python3 bench/reference/peft_profile.py --preset llama3.2-1b --batch 8 --seq 2048 \\
        --targets all-linear --rank 16 --alpha 32 --liger --steps 2 --warmup-steps 3
"""
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peft_build  # noqa: E402
import peft_lora_bench as base  # noqa: E402

def group(name):
    """The kernel's group: Triton kernels (Liger's) are bare names; CUDA C++ ones are `void ...`."""
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "sdpa", "attention")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "splitk")):
        return "gemm"
    if not name.startswith("void ") and "::" not in name:
        return "triton"
    if any(k in low for k in ("copy", "cast", "cat")):
        return "copy / cast"
    if any(k in low for k in ("reduce", "softmax", "norm")):
        return "reduction / softmax"
    if "foreach" in low or "adam" in low:
        return "optimizer"
    if "elementwise" in low:
        return "element-wise"
    return "other"


def main():
    args = base.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    model, opt = peft_build.build(args, "cuda")
    g = torch.Generator().manual_seed(args.seed + 1)
    n = args.warmup_steps + args.steps
    data = torch.randint(0, model.config.vocab_size, (n, args.batch, args.seq), generator=g).cuda()

    def step(ids):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup_steps):
        step(data[i])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(args.warmup_steps, n):
            step(data[i])
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]
            k[0] += e.device_time_total / 1e3 / args.steps  # ms a step
            k[1] += 1 / args.steps
    groups = defaultdict(float)
    for name, (ms, _) in kernels.items():
        groups[group(name)] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    for name, (ms, calls) in top[:40]:
        print(f"{ms:9.2f} ms {calls:7.0f}x  {group(name):15s} {name[:110]}")
    total = sum(groups.values())
    print(json.dumps({"bench": "peft_profile", "tag": args.tag, "argv": sys.argv[1:],
                      "gpu_name": torch.cuda.get_device_name(0),
                      "kernel_ms_per_step": total, "groups_ms_per_step": dict(groups),
                      "launches_per_step": sum(c for _, c in kernels.values()),
                      "top": [[n_, ms, c] for n_, (ms, c) in top[:60]]}))


if __name__ == "__main__":
    main()
