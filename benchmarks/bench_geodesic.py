"""Geodesic sharpness against the adaptive worst case it corrects, on the transformers the study
uses: the zoo's ViT and the BERT example.

    python -m benchmarks.bench_geodesic [--device cpu|cuda] [--rounds 5] [--out benchmarks/GEODESIC_RESULTS.md]

For each model, in one run and interleaved round by round (best of ``--rounds``): the bare
forward+backward passes the solver needs (``n_iters + 1`` per batch), ``worst_case_sharpness(norm="l2",
solver="scaled")`` (the adaptive worst case, same APGD), and ``geodesic_sharpness`` with both
metrics on the fast path and on the reference. Ratios are against the adaptive worst case.
"""
from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

import sharpfast
from benchmarks.bench_sharpness import clock
from benchmarks.results import write_section
from sharpfast.objective import call_model, unwrap_logits
from sharpfast.study import zoo
from sharpfast.study.experiments import bert_example

RHO, N_ITERS, N_BATCHES, BATCH = 0.1, 20, 4, 64


def zoo_vit(device):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(BATCH, 8, 8, generator=g).to(device), torch.randint(0, 10, (BATCH,), generator=g).to(device))
               for _ in range(N_BATCHES)]
    return zoo.vit(width=32).to(device), batches


def bert(device):
    model = bert_example.tiny_bert(0).to(device)
    x, y = bert_example.examples(N_BATCHES * BATCH)
    batches = [({k: v[i:i + BATCH].to(device) for k, v in x.items()}, y[i:i + BATCH].to(device))
               for i in range(0, N_BATCHES * BATCH, BATCH)]
    return model, batches


MODELS = {"zoo ViT (width 32)": zoo_vit, "BERT example": bert}


def bare(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for x, y in batches:
        for _ in range(N_ITERS + 1):
            torch.autograd.grad(F.cross_entropy(unwrap_logits(call_model(model, x)), y), params)


def methods(model, batches):
    geo = lambda metric, backend: lambda: sharpfast.geodesic_sharpness(model, batches, RHO, metric=metric,
                                                                       n_iters=N_ITERS, backend=backend)
    return {
        "bare forward+backward": lambda: bare(model, batches),
        "adaptive worst case (scaled)": lambda: sharpfast.worst_case_sharpness(model, batches, RHO, norm="l2",
                                                                              solver="scaled", n_iters=N_ITERS),
        "geodesic mix": geo("mix", "auto"),
        "geodesic inv": geo("inv", "auto"),
        "geodesic mix, reference": geo("mix", "reference"),
        "geodesic inv, reference": geo("inv", "reference"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [f"### {device.type}: {name}, torch {torch.__version__}, {torch.get_num_threads()} threads",
             "", f"rho {RHO}, {N_ITERS} APGD iterations, {N_BATCHES} batches of {BATCH}; best of {args.rounds} "
             "interleaved rounds. Command: `python -m benchmarks.bench_geodesic`", ""]
    for model_name, make in MODELS.items():
        model, batches = make(device)
        blocks = sharpfast.find_gl_blocks(model)
        todo = methods(model, batches)
        best = {k: float("inf") for k in todo}
        for fn in todo.values():   # warm-up
            fn()
        for _ in range(args.rounds):
            for k, fn in todo.items():
                best[k] = min(best[k], clock(fn, device))
        base = best["adaptive worst case (scaled)"]
        n_params = sum(p.numel() for p in model.parameters())
        lines += [f"**{model_name}**: {n_params:,} parameters, {len(blocks)} GL blocks", "",
                  "| method | seconds | vs adaptive |", "|---|---:|---:|"]
        lines += [f"| {k} | {t:.3f} | {t / base:.2f}x |" for k, t in best.items()]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_section(args.out, f"geodesic-{device.type}", text,
                      "# Geodesic sharpness: cost against the adaptive worst case\n\n"
                      "Written by `python -m benchmarks.bench_geodesic --out benchmarks/GEODESIC_RESULTS.md`.\n")


if __name__ == "__main__":
    main()
