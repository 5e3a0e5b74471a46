"""A worked own-zoo example: tiny BERTs built from a config (no downloads), fine-tuned on a
synthetic text task, saved with ``save_pretrained``, and the table ``sharpfast manifest`` reads.

    python -m sharpfast.study.experiments.bert_example --out bert-zoo
    sharpfast manifest --table bert-zoo/models.csv --data sharpfast.study.experiments.bert_example:data --out bert-zoo
    sharpfast sweep --zoo bert-zoo --kind max --norm linf --rho 0.0005 --normalize-logits norm
    sharpfast report --store bert-zoo/results.db

The task: sequences of tokens, labelled 1 where token ``A`` occurs more often than token ``B``.
The test set has the training distribution; the out-of-distribution set has sequences twice as long
(the same rule, positions never seen in training).
"""
from __future__ import annotations

import argparse
import csv
import os

import torch
import torch.nn.functional as F

VOCAB, TOKEN_A, TOKEN_B, PAD = 16, 2, 3, 0
LENGTH = 12
LEARNING_RATES = (3e-4, 2e-3)


def grid(n_seeds: int = 2) -> list[dict]:
    """The fine-tuning grid: both learning rates, ``n_seeds`` seeds each."""
    return [dict(lr=lr, seed=seed) for lr in LEARNING_RATES for seed in range(n_seeds)]


GRID = grid()


def examples(n: int, length: int = LENGTH, seed: int = 0):
    """``({"input_ids", "attention_mask"}, labels)``: ``n`` sequences of ``length`` tokens (the last
    few padded at random), labelled ``count(A) > count(B)``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    lengths = torch.randint(length * 3 // 4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask + PAD * (1 - mask)
    labels = ((ids == TOKEN_A).sum(1) > (ids == TOKEN_B).sum(1)).long()
    return {"input_ids": ids, "attention_mask": mask}, labels


def data(n_examples: int, seed: int = 0):
    """The sweep's data factory: ``n_examples`` training examples."""
    return examples(n_examples, seed=seed)


def tiny_bert(seed: int):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=2 * LENGTH, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


@torch.no_grad()
def error(model, x, y) -> float:
    model.eval()
    return float((model(**x).logits.argmax(1) != y).double().mean())


def fine_tune(lr: float, seed: int, epochs: int = 8, n_train: int = 512, batch_size: int = 32):
    """One model of the grid and its metrics (train, test and out-of-distribution error)."""
    model = tiny_bert(seed)
    x, y = examples(n_train, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(**{k: v[idx] for k, v in x.items()}).logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    xt, yt = examples(512, seed=1)
    xo, yo = examples(512, length=2 * LENGTH, seed=2)
    return model.eval(), {"train_error": error(model, x, y), "test_error": error(model, xt, yt),
                          "ood_error": error(model, xo, yo)}


def build(out: str, epochs: int = 8, grid=GRID) -> str:
    """Fine-tune the grid, ``save_pretrained`` each model under ``out``, write ``out/models.csv``."""
    os.makedirs(out, exist_ok=True)
    rows = []
    for hp in grid:
        model, metrics = fine_tune(hp["lr"], hp["seed"], epochs=epochs)
        name = f"bert-lr{hp['lr']:g}-s{hp['seed']}"
        model.save_pretrained(os.path.join(out, name))
        rows.append({"id": name, "hf_folder": name, "hf_class": "AutoModelForSequenceClassification",
                     **{f"hp_{k}": v for k, v in hp.items()}, **metrics})
    path = os.path.join(out, "models.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="tiny BERTs fine-tuned on a synthetic task, and their table")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2, help="seeds per learning rate (models: 2 x seeds)")
    args = ap.parse_args(argv)
    print(f"wrote {build(args.out, args.epochs, grid(args.seeds))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
