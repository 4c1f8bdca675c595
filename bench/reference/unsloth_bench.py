#!/usr/bin/env python3
"""unsloth as a reference for `loraforge bench train`: the same random Llama, LoRA and loop as
peft_lora_bench.py, built and patched by unsloth (its fused LoRA MLP/QKV/O kernels, RoPE, RMSNorm,
chunked cross-entropy, and its own gradient checkpointing, which keeps the layer inputs in host
memory).

unsloth loads models from a folder, not a config, so the random model (peft_lora_bench.py's
build_model, seeded) is first saved in bf16 to --model-dir/<preset>-<hash of its config and seed>
(reused when present) with a small word-level tokenizer (no tokenizer travels; the ids are
random, as the reference's). Then
`FastLanguageModel.from_pretrained` (bf16, or its bitsandbytes NF4 with --quant nf4) and
`FastLanguageModel.get_peft_model` (rank, alpha, the seven Llama linears, dropout 0,
use_gradient_checkpointing "unsloth" with --grad-checkpoint, else False), fused AdamW on the
adapters, and the reference's timed loop: forward with labels = inputs, backward, step, zero_grad,
synchronised clocks, median step over the measured steps. tokens/s = batch * seq / median step;
memory is torch.cuda.max_memory_allocated over the steps (unsloth's host-side checkpoints are not
in it). The last line printed is one JSON object.

    python3 bench/reference/unsloth_bench.py --preset llama3.2-1b --batch 8 --seq 2048 \\
        --steps 8 --warmup-steps 3 --targets all-linear --rank 16 --alpha 32 --jsonl out.jsonl
"""
import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peft_lora_bench as base  # noqa: E402


def save_random_model(args, folder):
    """The seeded random Llama of `args.preset` in bf16 with a word-level tokenizer, in `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    torch.manual_seed(args.seed)
    config = base.make_llama_config(base.resolve_model_cfg(args), "sdpa")
    model = base.build_model(config, torch.bfloat16, "cuda", "sdpa")
    partial = folder + ".partial"
    model.save_pretrained(partial)
    del model
    torch.cuda.empty_cache()
    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(252)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>").save_pretrained(partial)
    os.replace(partial, folder)


def main():
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--model-dir", default="/tmp/unsloth-models",
                     help="where the random models are saved for unsloth to load")
    ours, rest = own.parse_known_args()
    args = base.parse_args(rest)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    result = {"bench": "unsloth_lora_bench", "version": 1, "status": "ok", "tag": args.tag,
              "argv": sys.argv[1:], "unix_time": int(time.time())}

    def emit(rc):
        line = json.dumps(result)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")
        return rc

    import torch
    phase = "import"
    try:
        import unsloth  # must come before transformers and peft: it patches them on import
        from unsloth import FastLanguageModel
        import transformers
        phase = "save"
        # Keyed by what the model is made of, so no run loads another's (a seq past the
        # preset's positions, explicit sizes, another seed).
        key = json.dumps([base.resolve_model_cfg(args), args.seed], sort_keys=True)
        folder = os.path.join(ours.model_dir,
                              f"{args.preset}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
        os.makedirs(ours.model_dir, exist_ok=True)
        save_random_model(args, folder)
        phase = "build"
        t0 = time.perf_counter()
        model, _ = FastLanguageModel.from_pretrained(
            model_name=folder, max_seq_length=args.seq, dtype=torch.bfloat16,
            load_in_4bit=args.quant == "nf4", fix_tokenizer=False, local_files_only=True)
        targets = list(base.LINEAR_NAMES) if args.targets == "all-linear" else args.targets.split(",")
        model = FastLanguageModel.get_peft_model(
            model, r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets,
            bias="none", use_gradient_checkpointing="unsloth" if args.grad_checkpoint else False,
            random_state=args.seed, max_seq_length=args.seq)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=True)
        build_s = time.perf_counter() - t0
        result["env"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                         "unsloth": unsloth.__version__, "gpu_name": torch.cuda.get_device_name(0)}
        result["settings"] = {"preset": args.preset, "batch": args.batch, "seq": args.seq,
                              "steps": args.steps, "warmup_steps": args.warmup_steps,
                              "grad_checkpoint": "unsloth" if args.grad_checkpoint else False,
                              "quant": args.quant, "rank": args.rank, "alpha": args.alpha,
                              "targets": targets, "optimizer": "torch AdamW fused",
                              "trainable_params": sum(p.numel() for p in trainable),
                              "trainable_dtypes": sorted({str(p.dtype) for p in trainable})}
        vocab = base.resolve_model_cfg(args)["vocab_size"]
        g = torch.Generator().manual_seed(args.seed + 1)
        data = torch.randint(0, vocab, (args.warmup_steps + args.steps, args.batch, args.seq),
                             generator=g, dtype=torch.long).to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        phase = "train"
        losses, times = [], []
        for i in range(len(data)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = model(input_ids=data[i], labels=data[i]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            losses.append(float(loss.detach().float().item()))
            if i >= args.warmup_steps:
                times.append(dt)
            print(f"   step {i:3d} {dt * 1e3:10.2f} ms loss {losses[-1]:.4f}", flush=True)
    except torch.cuda.OutOfMemoryError as e:
        result.update(status="oom", error=f"OOM during {phase}: {str(e).splitlines()[0]}",
                      peak_mem_gib_at_oom=torch.cuda.max_memory_allocated() / 2**30)
        return emit(2)
    except Exception as e:  # an import or patching failure is the finding: say it in the line
        traceback.print_exc()
        result.update(status="error", error=f"{type(e).__name__} during {phase}: {e}")
        return emit(1)
    med = statistics.median(times)
    result["results"] = {
        "build_s": build_s, "step_ms_median": med * 1e3, "step_ms_all": [t * 1e3 for t in times],
        "tokens_per_s": args.batch * args.seq / med, "loss_first": losses[0],
        "loss_last": losses[-1], "losses_finite": all(math.isfinite(x) for x in losses),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    print(f"-- unsloth: median step {med * 1e3:.2f} ms, "
          f"{result['results']['tokens_per_s']:,.0f} tokens/s, "
          f"peak {result['results']['peak_mem_gib']:.2f} GiB", flush=True)
    return emit(0)


if __name__ == "__main__":
    sys.exit(main())
