"""Train a character-level GPT on flashtile, then sample from it.

The text is the Python standard library's own source code (every machine with Python has it,
no download). The model is :class:`flashtile.models.GPT`; every attention call in training
(forward and backward) and in generation (KV cache) runs on flashtile.

    python examples/train_gpt.py --preset tiny                 # CPU: loss falls within minutes
    python examples/train_gpt.py --preset tiny --resume        # continue from the checkpoint
    python examples/train_gpt.py --preset tiny --steps 0 --resume --sample-tokens 500   # just sample
    python examples/train_gpt.py --preset gpt2-small --device cuda --batch-size 32 --seq-len 512 --steps 2000

Prints the loss every ``--log-every`` steps, the validation loss every ``--eval-every`` steps,
training throughput in tokens/s, saves a checkpoint (model, optimizer, config, vocabulary,
step, loss history) to ``--ckpt`` and finally samples text from the model.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from flashtile.models import GPT, GPTConfig

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to plain log lines
    tqdm = None


def load_corpus(max_chars: int) -> str:
    """Concatenated ``.py`` sources of the standard library (top level first, then packages),
    in a fixed order, up to ``max_chars`` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(p for p in root.glob("*/*.py") if "test" not in p.parts[-2])
    parts, n = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(text)
        n += len(text)
        if n >= max_chars:
            break
    if not parts:
        sys.exit(f"no .py files found under {root}")
    return "".join(parts)[:max_chars]


class CharData:
    """Character vocabulary and random (input, target) windows from a 90/10 train/val split."""

    def __init__(self, text: str, chars: list[str] | None = None):
        self.chars = chars or sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        unk = self.stoi.get("?", 0)  # characters unseen at training time (resumed on another Python)
        data = torch.tensor([self.stoi.get(c, unk) for c in text], dtype=torch.long)
        cut = int(0.9 * len(data))
        self.train, self.val = data[:cut], data[cut:]

    def encode(self, s: str) -> list[int]:
        return [self.stoi.get(c, 0) for c in s]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def batch(self, split: str, batch_size: int, seq_len: int, gen: torch.Generator, device) -> tuple:
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=gen)
        x = torch.stack([data[i : i + seq_len] for i in ix.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + seq_len] for i in ix.tolist()])
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def evaluate(model, data, args, gen, device, autocast) -> float:
    model.eval()
    losses = []
    for _ in range(args.eval_batches):
        x, y = data.batch("val", args.batch_size, args.seq_len, gen, device)
        with autocast:
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", help="GPTConfig preset (tiny, gpt2-small, ...)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype (auto: bfloat16 on cuda, float32 on cpu)")  # fmt: skip
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (total, counting resumed ones)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=None, help="training window (default: the preset's block_size)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--max-chars", type=int, default=4_000_000, help="corpus size in characters")
    p.add_argument("--ckpt", default=None, help="checkpoint path (default: <tmpdir>/flashtile-gpt-<preset>.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt if it exists")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--sample-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]  # fmt: skip
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    torch.manual_seed(args.seed)
    ckpt_path = Path(args.ckpt or os.path.join(tempfile.gettempdir(), f"flashtile-gpt-{args.preset}.pt"))

    ckpt = torch.load(ckpt_path, map_location="cpu") if args.resume and ckpt_path.exists() else None
    data = CharData(load_corpus(args.max_chars), chars=ckpt["chars"] if ckpt else None)
    if ckpt:
        cfg = GPTConfig(**ckpt["config"])
    else:
        cfg = GPTConfig.from_preset(args.preset, vocab_size=len(data.chars))
    args.seq_len = min(args.seq_len or cfg.block_size, cfg.block_size)
    model = GPT(cfg).to(device)
    decay = [p_ for n, p_ in model.named_parameters() if p_.dim() >= 2]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))  # fmt: skip
    step, history = 0, []
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history = ckpt["step"], ckpt["history"]
        print(f"resumed from {ckpt_path} at step {step}")
    print(f"corpus: {len(data.train) + len(data.val):,} chars of Python stdlib source, vocab {len(data.chars)}; "
          f"model: {args.preset}, {model.num_params() / 1e6:.2f}M params, {cfg.n_layer} layers, "
          f"d={cfg.n_embd}, heads {cfg.n_head}/{cfg.n_kv_head or cfg.n_head}; device {device}, {dtype}; "
          f"batch {args.batch_size} x {args.seq_len} tokens")  # fmt: skip
    train_model = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed + step)

    def save() -> None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": asdict(cfg),
                    "chars": data.chars, "step": step, "history": history}, ckpt_path)  # fmt: skip

    model.train()
    todo, start_step = max(0, args.steps - step), step
    bar = tqdm(total=todo, desc="train", dynamic_ncols=True, mininterval=1.0) if tqdm and todo else None
    t_start = time.perf_counter()
    t_win, tok_win, loss_win = t_start, 0, []
    tokens_per_step = args.batch_size * args.seq_len
    tok_s = float("nan")
    while step < args.steps:
        if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
            print(f"time limit of {args.time_limit:.0f}s reached at step {step}")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = data.batch("train", args.batch_size, args.seq_len, gen, device)
        with autocast:
            _, loss = train_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_win.append(loss.item())
        tok_win += tokens_per_step
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_win[-1]:.3f}")
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            tok_s = tok_win / (now - t_win)
            mean = sum(loss_win) / len(loss_win)
            history.append({"step": step, "train_loss": mean, "tok_s": tok_s, "time_s": now - t_start})
            msg = f"step {step:5d}  loss {mean:.4f}  lr {opt.param_groups[0]['lr']:.2e}  {tok_s:,.0f} tok/s"
            if step % args.eval_every == 0 or step == args.steps:
                val = evaluate(model, data, args, gen, device, autocast)
                history[-1]["val_loss"] = val
                msg += f"  val {val:.4f}"
                save()
            (bar.write if bar else print)(msg)
            t_win, tok_win, loss_win = time.perf_counter(), 0, []
    if bar:
        bar.close()
    if todo:
        save()
        elapsed = time.perf_counter() - t_start
        print(f"trained {step - start_step} steps in {elapsed:.0f}s; checkpoint: {ckpt_path}")
        curve = ", ".join(f"{h['step']}: {h['train_loss']:.3f}" for h in history)
        print(f"loss curve (step: mean train loss since the previous point): {curve}")
        rates = [h["tok_s"] for h in history]
        if rates:
            print(f"throughput: {sum(rates) / len(rates):,.0f} tokens/s on average")

    model.eval()
    prompt = torch.tensor([data.encode(args.prompt)], dtype=torch.long, device=device)
    n = min(args.sample_tokens, cfg.block_size - prompt.shape[1])
    with autocast:
        out = model.generate(prompt, n, temperature=args.temperature, top_k=args.top_k,
                             generator=torch.Generator(device=device).manual_seed(args.seed))  # fmt: skip
    print(f"--- sample ({n} tokens, temperature {args.temperature}, top-k {args.top_k}, KV cache) ---")
    print(data.decode(out[0].tolist()))


if __name__ == "__main__":
    main()
