"""`rnnserve-train`: train a recurrent or state-space language model with truncated BPTT.

The training text is cut into `batch_size` parallel streams; each step reads the next
`seq_len` characters of every stream, and the state is carried (detached) from one step to the
next, so the model learns from context far longer than one backpropagation window, the way it
will be served. The data is text (characters or a byte-level BPE trained on the training split) or
ids without text (Bach chorales, next note): see datasets.py; the architecture is chosen by name
(architectures.py). Every hyperparameter is a preset default, overridable by a flag; the run prints
its configuration and stores it in every checkpoint so that the result can be reproduced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rnnserve.evaluate import EVAL_CHUNK, EVAL_STREAMS, Score, evaluate
from rnnserve.export.architectures import ARCHITECTURES, build_model
from rnnserve.export.bpe import DEFAULT_VOCAB_SIZE
from rnnserve.export.datasets import DATASETS, TOKENIZERS, load_token_data
from rnnserve.export.model import count_parameters
from rnnserve.vocab import Vocabulary

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "lstm"          # rnn | gru | lstm | ssm (architectures.py)
    dataset: str = "text"       # text | bach-chorales (ids, next note)
    tokenizer: str = "chars"    # text only: chars | bpe (byte-level, trained on the training split)
    bpe_vocab_size: int = DEFAULT_VOCAB_SIZE
    embed_size: int = 128
    hidden_size: int = 512
    layers: int = 2
    dropout: float = 0.15       # validation plays are unseen text; 0.25+ underfits in this budget
    batch_size: int = 64        # parallel streams
    seq_len: int = 128          # backpropagation window
    lr: float = 4e-3            # 2e-3 and 3e-3 ended worse, 5e-3 no better (sweep in docs/TRAINING.md)
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.2   # decoupled (AdamW) decay on matrices only
    grad_clip: float = 1.0
    max_steps: int = 3200       # 26 M characters (~5.7 epochs): ~100 min at 4,400 tok/s on 2 cores
    eval_every: int = 500
    eval_chunks: int = 8        # periodic validation reads this many chunks of every stream
    seed: int = 1234
    corpus: str | None = None   # None: the default Shakespeare corpus
    state_size: int = 32        # ssm only: N, the state per channel of a head
    head_size: int = 32         # ssm only: P, channels per head
    chunk_size: int = 32        # ssm only: prefill chunk length of the scan

    def build_model(self, vocab_size: int) -> nn.Module:
        return build_model(self.arch, vocab_size, embed_size=self.embed_size, hidden_size=self.hidden_size,
                           layers=self.layers, dropout=self.dropout, state_size=self.state_size,
                           head_size=self.head_size, chunk_size=self.chunk_size)


# The default is sized to train in under two hours on 2 CPU cores (see docs/TRAINING.md).
PRESETS = {
    "default": TrainConfig(),
    "quick": TrainConfig(arch="gru", hidden_size=384, embed_size=64, dropout=0.1, weight_decay=0.1,
                         max_steps=1200, eval_every=200),
    "tiny": TrainConfig(arch="gru", hidden_size=32, embed_size=16, layers=1, dropout=0.0, batch_size=8,
                        seq_len=32, max_steps=30, eval_every=10, eval_chunks=2, warmup_steps=5),
    # The three architectures of docs/ARCHITECTURES.md, each sized for about 10 minutes on one shared
    # core: far from trained (the default LSTM reads 26 M characters); longer runs do better.
    "bpe-gru": TrainConfig(arch="gru", tokenizer="bpe", embed_size=128, hidden_size=256, dropout=0.1,
                           batch_size=32, seq_len=64, warmup_steps=20, weight_decay=0.1, max_steps=120,
                           eval_every=60, eval_chunks=4),
    "ssm": TrainConfig(arch="ssm", hidden_size=192, dropout=0.1, batch_size=16, lr=3e-3, warmup_steps=20,
                       weight_decay=0.1, max_steps=120, eval_every=60, eval_chunks=4),
    "chorales": TrainConfig(arch="gru", dataset="bach-chorales", embed_size=32, hidden_size=128, layers=1,
                            dropout=0.2, batch_size=16, seq_len=32, lr=3e-3, warmup_steps=30, weight_decay=0.1,
                            max_steps=2000, eval_every=250, eval_chunks=8),
}


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def torch_step_fn(model: nn.Module, device: torch.device):
    """Adapt the model to the numpy step function that `evaluate` drives."""
    def step(tokens: np.ndarray, state: tuple) -> tuple[np.ndarray, tuple]:
        logits, *new = model(torch.from_numpy(tokens).to(device), *state)
        return logits.float().cpu().numpy(), tuple(new)
    return step


@torch.no_grad()
def validate(model: nn.Module, val_ids: np.ndarray, max_chunks: int | None,
             characters: np.ndarray | None = None) -> Score:
    device = next(model.parameters()).device
    state = tuple(s.to(device) for s in model.initial_state(EVAL_STREAMS))
    model.eval()
    try:
        return evaluate(torch_step_fn(model, device), state, val_ids, EVAL_STREAMS, EVAL_CHUNK, max_chunks,
                        characters, text=characters is not None)
    finally:
        model.train()


class Trainer:
    """Owns one run: data streams, model, optimizer, history; writes checkpoints to `out_dir`."""

    def __init__(self, config: TrainConfig, out_dir: Path, device: str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.out_dir = out_dir
        self.data = load_token_data(config.dataset, config.corpus, config.tokenizer, config.bpe_vocab_size)
        self.corpus_description = self.data.description
        # The character vocabulary, which rnnserve-export's bundles take; None for the other kinds.
        record = self.data.vocabulary
        self.vocab = Vocabulary(record["tokens"]) if record["kind"] == "characters" else None
        ids = self.data.train_ids
        length = len(ids) // config.batch_size
        if length <= config.seq_len + 1:
            raise ValueError(f"corpus too short: {len(ids)} training tokens for "
                             f"batch_size={config.batch_size} x seq_len={config.seq_len}")
        self.train_streams = torch.from_numpy(
            ids[: length * config.batch_size].reshape(config.batch_size, length)).to(self.device)
        self.val_ids = self.data.val_ids
        characters = self.data.characters
        self.characters = None if characters is None else torch.from_numpy(characters).to(self.device)
        set_seed(config.seed)
        self.model = config.build_model(self.data.vocab_size).to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2 or "embed" in n]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.99))
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict] = []
        self.final: dict | None = None

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, name: str = CHECKPOINT) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / name
        tmp = path.with_suffix(".tmp")
        torch.save({"config": dataclasses.asdict(self.config), "arch": self.config.arch,
                    "model_config": self.model.config.to_dict(),
                    "vocab": self.vocab.tokens if self.vocab else None, "vocabulary": self.data.vocabulary,
                    "corpus": self.corpus_description,
                    "model": {k: v.cpu() for k, v in self.model.state_dict().items()}, "optimizer": self.optimizer.state_dict(),
                    "step": self.step, "train_seconds": self.train_seconds, "history": self.history,
                    "final_validation": self.final, "device": str(self.device),
                    "torch_rng": torch.get_rng_state()}, tmp)
        os.replace(tmp, path)
        return path

    def resume(self, path: Path) -> None:
        ckpt = torch.load(path, weights_only=False, map_location=self.device)
        if ckpt.get("vocabulary", {"kind": "characters", "tokens": ckpt["vocab"]}) != self.data.vocabulary:
            raise ValueError(f"{path} was trained on another vocabulary; start a fresh run")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.train_seconds, self.history = ckpt["step"], ckpt["train_seconds"], ckpt["history"]
        torch.set_rng_state(ckpt["torch_rng"].cpu())

    # -- the loop ---------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Inputs and targets [batch, seq_len] for `step`, and whether the streams restart there."""
        per_epoch = (self.train_streams.shape[1] - 1) // self.config.seq_len
        start = (step % per_epoch) * self.config.seq_len
        window = self.train_streams[:, start: start + self.config.seq_len + 1]
        return window[:, :-1], window[:, 1:], step % per_epoch == 0

    def fresh_state(self) -> list[torch.Tensor]:
        return [s.to(self.device) for s in self.model.initial_state(self.config.batch_size)]

    def run(self, budget_seconds: float | None = None) -> None:
        """Train to max_steps (or the budget). A resumed run restarts the carried state from zeros."""
        config = self.config
        state = self.fresh_state()
        loss_fn = nn.CrossEntropyLoss()
        bar = tqdm(total=config.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        started = time.monotonic()
        window_tokens, window_start, running = 0, time.monotonic(), None
        while self.step < config.max_steps:
            if budget_seconds is not None and self.train_seconds + time.monotonic() - started > budget_seconds:
                bar.write(f"wall-clock budget of {budget_seconds:.0f} s reached at step {self.step}")
                break
            inputs, targets, restart = self.batch(self.step)
            if restart:
                state = self.fresh_state()
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(config, self.step)
            logits, *state = self.model(inputs, *state)
            state = [s.detach() for s in state]
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            self.step += 1
            bits = loss.item() / math.log(2) * self.tokens_per_unit(targets)
            running = bits if running is None else 0.98 * running + 0.02 * bits
            window_tokens += inputs.numel()
            rate = window_tokens / max(1e-9, time.monotonic() - window_start)
            bar.set_postfix(loss_bpc=f"{running:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update()
            if self.step % config.eval_every == 0 or self.step == config.max_steps:
                self.train_seconds += time.monotonic() - started
                started = time.monotonic()
                score = validate(self.model, self.val_ids, config.eval_chunks, self.data.characters)
                self.history.append({"step": self.step, "tokens": self.step * inputs.numel(),
                                     "seconds": round(self.train_seconds, 1), "train_bpc": round(running, 4),
                                     "val_bpc": round(score.bits_per_char, 4), "lr": learning_rate(config, self.step)})
                bar.write(f"step {self.step}: train {running:.3f} {self.unit_label}, val {score.bits_per_char:.3f} "
                          f"{self.unit_label} (top-1 {score.top1:.3f}), {self.train_seconds / 60:.1f} min")
                self.save()
                plot_history(self.history, self.out_dir / "loss.png", self.data.unit)
                started = time.monotonic()
                window_tokens, window_start = 0, time.monotonic()
        self.train_seconds += time.monotonic() - started
        bar.close()
        self.final = validate(self.model, self.val_ids, None, self.data.characters).to_dict()
        print(f"full validation: {self.final}")
        self.save()

    @property
    def unit_label(self) -> str:
        return "bpc" if self.data.unit == "character" else "bits/token"

    def tokens_per_unit(self, targets: torch.Tensor) -> float:
        """Turns the loss per token into bits per character for text over a subword vocabulary."""
        return 1.0 if self.characters is None else targets.numel() / int(self.characters[targets].sum())


def plot_history(history: list[dict], path: Path, unit: str = "character") -> None:
    """The loss curve beside the checkpoint: training and validation bits per character (or token)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    # Characters read, not minutes: the curve is the same on any device that runs the same steps.
    tokens = [h["tokens"] / 1e6 for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(tokens, [h["train_bpc"] for h in history], label="train (running mean, dropout on)")
    ax.plot(tokens, [h["val_bpc"] for h in history], label="validation (held-out files)")
    ax.set_xlabel("training tokens read (millions)")
    ax.set_ylabel(f"bits per {unit}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FLAG_HELP = {
    "arch": "rnn, gru, lstm (recurrent cells) or ssm (Mamba-2-style selective state space); "
            "--cell is the same flag (preset value if omitted)",
    "dataset": "text (--corpus) or bach-chorales (next note, ids without text; music21's corpus)",
    "tokenizer": "text only: chars, or bpe (a byte-level BPE of --bpe-vocab-size tokens trained on the "
                 "training split)",
    "embed_size": "embedding width of rnn/gru/lstm; an ssm's embedding is --hidden-size wide",
    "state_size": "ssm only: the state each head keeps per channel (N)",
    "head_size": "ssm only: channels per head (P)",
    "chunk_size": "ssm only: chunk length of the prefill scan",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rnnserve-train",
        description="Train an RNN/GRU/LSTM or a Mamba-2-style SSM on text (characters or byte-level BPE) "
                    "or on ids (Bach chorales). Starts from a preset; any flag below overrides one of its "
                    "values. Writes checkpoint.pt and loss.png to --out.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="starting configuration: default (the served model, < 2 h on 2 cores), "
                             "quick (< 30 min), tiny (seconds, for tests); bpe-gru, ssm and chorales "
                             "(~10 min each, docs/ARCHITECTURES.md)")
    parser.add_argument("--out", type=Path, default=Path("runs/default"), help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="stop after this much training time even if max_steps is not reached")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device; the presets are sized for cpu")
    for field in dataclasses.fields(TrainConfig):
        kind = str if field.name == "corpus" else field.type
        kind = {"int": int, "float": float, "str": str}.get(kind, str) if isinstance(kind, str) else kind
        choices = {"arch": ARCHITECTURES, "dataset": DATASETS, "tokenizer": TOKENIZERS}.get(field.name)
        flags = [f"--{field.name.replace('_', '-')}", *(["--cell"] if field.name == "arch" else [])]
        parser.add_argument(*flags, type=kind, default=None, choices=choices, dest=field.name,
                            help=FLAG_HELP.get(field.name, "(preset value if omitted)"))
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(PRESETS[args.preset], **overrides)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = config_from_args(args)
    print(json.dumps({"preset": args.preset, **dataclasses.asdict(config)}, indent=None))
    trainer = Trainer(config, args.out, args.device)
    if args.resume and (args.out / CHECKPOINT).exists():
        trainer.resume(args.out / CHECKPOINT)
        print(f"resumed at step {trainer.step}")
    print(f"{count_parameters(trainer.model):,} parameters; {len(trainer.data.train_ids):,} train / "
          f"{len(trainer.val_ids):,} validation tokens")
    trainer.run(args.budget_minutes * 60 if args.budget_minutes else None)
    print(f"done: step {trainer.step}, {trainer.train_seconds / 60:.1f} min; checkpoint {args.out / CHECKPOINT}")


if __name__ == "__main__":
    main()
