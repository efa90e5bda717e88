"""Peak memory of one GRAO training step vs group size G: fused loss vs eager loss, full batch vs micro-batches.

Each point runs in a fresh subprocess (so peaks do not leak between points) and does one full update of
a Llama-shaped model with a 32k vocabulary: backbone forward, the GRAO loss over P * (G + 1) rows,
backward, gradient clipping and an AdamW step, through ``grao.trainer.Trainer.accumulate_gradients``.
Generation is left out (completions are random tokens of fixed length) so that the number measures the
update, which is where the full [B, T, V] logits of the eager loss live.

CPU: peak resident set size of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its
growth over the RSS just before the step. CUDA: ``torch.cuda.max_memory_allocated`` during the step.

    python benchmarks/trainer_memory.py                   # CPU, writes runs/bench/trainer/
    python benchmarks/trainer_memory.py --out benchmarks/results/trainer   # the committed results
    python benchmarks/trainer_memory.py --device cuda     # when a GPU is present
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_point(args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from grao import demo
    from grao.trainer import Rollout, TrainConfig, Trainer

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg_model = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=args.prompt_len + args.completion_len + 8,
                            tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(cfg_model, attn_implementation="sdpa").to(device)
    tok = demo.build_tokenizer()  # only pad/eos ids are used: rows are token ids already
    # micro_batch_rows 0 = the whole batch in one pass, on padded rows, as when these numbers were taken
    # (the trainer's defaults since then: prefix sharing and token-budget micro-batches, benchmarks/prefix_sharing.py)
    cfg = TrainConfig(method="grao", loss_impl=args.impl, micro_batch_rows=int(args.micro), group_size=args.G,
                      micro_batch_tokens=0, prefix_sharing=False,
                      prompts_per_step=args.prompts, output_dir="runs/trainer_memory", progress=False, plot=False,
                      tensorboard="false", device=args.device, bf16="auto" if device.type == "cuda" else "false")
    records = [{"prompt": "x", "reference": "y"}]
    trainer = Trainer(cfg, model=model, tokenizer=tok, train_records=records)
    g = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(4, args.vocab, (n,), generator=g).tolist()

    P, G = args.prompts, args.G
    ro = Rollout(records * P, ["x"] * P, [toks(args.prompt_len) for _ in range(P)],
                 [[toks(args.completion_len) for _ in range(G)] for _ in range(P)], [[""] * G for _ in range(P)],
                 [toks(args.completion_len) for _ in range(P)], torch.rand(P, G + 1, generator=g))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate_gradients(ro)
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
    trainer.optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"G": G, "impl": trainer.loss_impl, "micro_batch_rows": int(args.micro), "rows": P * (G + 1),
            "peak_mb": peak / 2 ** 20, "growth_mb": (peak - before) / 2 ** 20, "seconds": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", default="4,8,16,32")
    p.add_argument("--impls", default="eager,fused")
    p.add_argument("--micro", default="0,4", help="micro_batch_rows values (0 = whole batch)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "trainer"),
                   help="output folder (default runs/bench/trainer; the committed results change only with "
                        "--out benchmarks/results/trainer)")
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--G", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--impl", default="eager", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point:
        print(json.dumps(one_point(args)))
        return 0
    rows = []
    common = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--prompts", str(args.prompts),
              "--prompt-len", str(args.prompt_len), "--completion-len", str(args.completion_len), "--device", args.device]
    for micro in args.micro.split(","):
        for impl in args.impls.split(","):
            for G in args.groups.split(","):
                cmd = [sys.executable, __file__, "--point", "--G", G, "--impl", impl, "--micro", micro, *common]
                res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if res.returncode != 0:
                    print(res.stderr[-2000:], file=sys.stderr)
                    return 1
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"G={row['G']:>3} impl={row['impl']:>5} micro={row['micro_batch_rows']:>2}: peak "
                      f"{row['peak_mb']:8.0f} MB (+{row['growth_mb']:7.0f} MB in the step) {row['seconds']:.1f} s",
                      flush=True)
    import torch
    import transformers
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    device_name = torch.cuda.get_device_name(0) if tag == "cuda" else platform.processor() or platform.machine()
    meta = (f"Date {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}; torch "
            f"{torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
            f"device {args.device} ({device_name}, {os.cpu_count()} CPUs).\n\nCommand: `python benchmarks/"
            f"trainer_memory.py {' '.join(sys.argv[1:])}`\n\nModel: Llama-shaped, 2 layers, hidden {args.hidden}, "
            f"vocab {args.vocab} (untied head); {args.prompts} prompt(s) x (G + 1) rows of {args.prompt_len} prompt + "
            f"{args.completion_len} completion tokens; one step = forward + GRAO loss + backward + clip + AdamW.")
    metric = "peak RSS of the process" if tag == "cpu" else "torch.cuda.max_memory_allocated"
    lines = [f"# Peak memory of one GRAO training step ({tag})", "", meta, "",
             f"Memory: {metric}; 'step growth' = peak minus the value just before the step. micro_batch_rows 0 is "
             f"the whole batch at once.", "",
             "| G | rows | loss | micro_batch_rows | peak MB | step growth MB | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['G']} | {r['rows']} | {r['impl']} | {r['micro_batch_rows']} | {r['peak_mb']:.0f} | "
                     f"{r['growth_mb']:.0f} | {r['seconds']:.1f} |")
    (out / f"memory_{tag}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / f"memory_{tag}.csv", "w", encoding="utf-8") as fh:
        fh.write("G,rows,impl,micro_batch_rows,peak_mb,growth_mb,seconds\n")
        for r in rows:
            fh.write(f"{r['G']},{r['rows']},{r['impl']},{r['micro_batch_rows']},{r['peak_mb']:.1f},"
                     f"{r['growth_mb']:.1f},{r['seconds']:.2f}\n")
    print(f"wrote {out / f'memory_{tag}.md'} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
