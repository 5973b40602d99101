"""nanoGPT's shakespeare_char CPU recipe, written again in plain PyTorch: the reference for kgpt's
time to quality (`benchmarks/time_to_quality.py --rounds`).

What nanoGPT's README runs on a CPU:
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
Its model (model.py): GPT-2 blocks with LayerNorm before attention and MLP, learned positions,
the output layer tied to the token embedding, GELU, N(0, 0.02) weights (residual projections
0.02 / sqrt(2 * n_layer)), no bias (train.py's default, which the config keeps; `--bias` adds it).
Its loop (train.py): random windows from `torch.randint`, AdamW (fused=False on a CPU, betas
(0.9, 0.99), weight decay 0.1 on the 2-D parameters), learning rate 1e-3 with 100 warm-up
iterations and a cosine to 1e-4 at iteration 2,000, gradient clipping at 1.0, an evaluation of
`eval_iters` random batches of each split every 250 iterations from iteration 0 (a checkpoint
when validation improves), iterations 0 to 2,000 inclusive, float32, no torch.compile.
Data (data/shakespeare_char/prepare.py): the sorted characters of the whole text as the
vocabulary (65), the first 90% to train, the rest to validate; read from kgpt's bundled copy.

Prints each evaluation with the seconds since the process started, then the whole time:
    python benchmarks/nanogpt_shakespeare_char.py
"""

import time

START = time.perf_counter()  # before importing torch: its import is part of the script's time

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

TEXT = os.path.join(os.path.dirname(__file__), "..", "kgpt", "data", "corpus_data", "tinyshakespeare", "input.txt")


class Block(nn.Module):
    """Pre-LayerNorm block: x + attention(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        # (batch, heads, length, head width)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(batch, length, width))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, bias):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, ids, targets):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def learning_rate(iteration, args):
    if iteration < args.warmup_iters:
        return args.learning_rate * (iteration + 1) / (args.warmup_iters + 1)
    if iteration > args.lr_decay_iters:
        return args.min_lr
    ratio = (iteration - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in [
        ("batch_size", 12), ("block_size", 64), ("n_layer", 4), ("n_head", 4), ("n_embd", 128),
        ("max_iters", 2000), ("lr_decay_iters", 2000), ("eval_interval", 250), ("eval_iters", 20),
        ("warmup_iters", 100), ("learning_rate", 1e-3), ("min_lr", 1e-4), ("weight_decay", 0.1),
        ("beta2", 0.99), ("grad_clip", 1.0), ("seed", 1337),
    ]:
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--bias", action="store_true", help="bias in LayerNorm and Linear layers")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    characters = sorted(set(text))
    table = {c: i for i, c in enumerate(characters)}
    data = torch.tensor([table[c] for c in text], dtype=torch.long)
    cut = int(len(data) * 0.9)
    splits = {"train": data[:cut], "val": data[cut:]}

    def batch(split):
        source = splits[split]
        starts = torch.randint(len(source) - args.block_size, (args.batch_size,))
        x = torch.stack([source[i : i + args.block_size] for i in starts])
        y = torch.stack([source[i + 1 : i + 1 + args.block_size] for i in starts])
        return x, y

    model = GPT(len(characters), args.block_size, args.n_layer, args.n_head, args.n_embd, args.bias)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in parameters if p.dim() >= 2], "weight_decay": args.weight_decay},
         {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(0.9, args.beta2), fused=False,
    )

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        losses = {split: torch.stack([model(*batch(split)) for _ in range(args.eval_iters)]).mean().item()
                  for split in ("train", "val")}
        model.train()
        return losses

    best_val = float("inf")
    checkpoints = tempfile.TemporaryDirectory()
    x, y = batch("train")
    for iteration in range(args.max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(iteration, args)
        if iteration % args.eval_interval == 0:
            losses = estimate_loss()
            print(f"step {iteration}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                  f"{time.perf_counter() - START:.1f} s", flush=True)
            if losses["val"] < best_val:
                best_val = losses["val"]
                if iteration > 0:  # as nanoGPT: a checkpoint when validation improves
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                               os.path.join(checkpoints.name, "ckpt.pt"))
        loss = model(x, y)
        x, y = batch("train")  # nanoGPT's order: the next batch before the backward pass
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT reads the loss every iteration with --log_interval=1
    checkpoints.cleanup()
    print(f"best val loss {best_val:.4f}; whole script {time.perf_counter() - START:.1f} s", flush=True)


if __name__ == "__main__":
    main()
