"""Training the zoo: one model, or models of one architecture and batch size as one stack, each
bit for bit as trained alone; the zoo built into a folder with its manifest (resumable)."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...optim import SAM
from . import digits
from .architectures import ARCHS, build, model_kwargs
from .checkpoints import MANIFEST_NAME, Manifest, ModelEntry, file_sha256, save_state_dict
from .grid import BASE_LR, OPTIONAL_TRAIN, ZooSpec, config_id


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """``(error, mean cross-entropy)`` in eval mode."""
    was = model.training
    model.eval()
    wrong, loss = 0, 0.0
    for i in range(0, len(y), batch_size):
        out = model(x[i:i + batch_size])
        loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
        wrong += int((out.argmax(1) != y[i:i + batch_size]).sum())
    model.train(was)
    return wrong / len(y), loss / len(y)


SMALL_LOSS = 0.1   # Jiang et al.'s num-step-to-0.1-loss: steps until the training cross-entropy is this small


def initialized(cfg: dict[str, Any]) -> nn.Module:
    """The model of ``cfg`` as training starts: the seed fixes the initialization."""
    torch.manual_seed(cfg["seed"])
    return build(cfg)


# the factors models of one stack may differ in; every other training setting they share
STACK_FACTORS = ("lr", "weight_decay", "augment", "seed", "sam_rho")
ZOO_STACK = 8   # models trained together at most (the default zoo's lr x weight decay x augmentation)


def stack_key(cfg: dict[str, Any]) -> str:
    """Configurations with one key train as one stack: the same architecture and width, batch
    size, epochs, optimizer and data."""
    return json.dumps({k: v for k, v in cfg.items() if k not in STACK_FACTORS}, sort_keys=True)


def train(cfg: dict[str, Any]) -> tuple[nn.Module, dict[str, float]]:
    """Train one model of the grid; return it (eval mode) and its metrics (a stack of one)."""
    return train_stack([cfg])[0]


def train_stack(cfgs: list[dict[str, Any]]) -> list[tuple[nn.Module, dict[str, float]]]:
    """Train models of one :func:`stack_key` together; return each (eval mode) with its metrics.

    Each model has its own initialization (its seed), batch order and augmentation (a generator
    seeded ``seed + 1``), learning rate and weight decay (its own parameter group of one
    ``torch.optim`` optimizer, SGD with momentum 0.9 or AdamW, and a cosine schedule; with a
    ``sam_rho``, ``sharpfast.optim.SAM`` around it, one per model: each ascent from its own
    gradient, ``sam_rho = 0`` the base optimizer's step bit for bit). One step
    is one vmapped forward and backward (``torch.func.functional_call`` over the models' stacked
    parameters) on every model's own batch, which removes per-operation overhead where that
    bounds a step (small batches, narrow models: the default zoo's 96 models took 189 core-seconds
    against 224 one after another, benchmarks/ZOO_RESULTS.md). Each model comes out bit for bit
    as trained alone, and the same configurations on the same machine and torch give
    bit-identical models.
    """
    from torch.func import functional_call, vmap

    if len({stack_key(c) for c in cfgs}) != 1:
        raise ValueError("a stack trains configurations that differ only in " + ", ".join(STACK_FACTORS))
    cfg0 = cfgs[0]
    x, y, xt, yt = digits.split(cfg0["n_train"], cfg0["n_test"], cfg0["split_seed"])
    models = [initialized(c) for c in cfgs]
    opt_name = cfg0["optimizer"]
    if opt_name not in BASE_LR:
        raise ValueError(f"unknown optimizer {opt_name!r}; expected one of {sorted(BASE_LR)}")
    groups = [dict(params=list(m.parameters()), lr=BASE_LR[opt_name] * float(c["lr"]),
                   weight_decay=c["weight_decay"]) for m, c in zip(models, cfgs)]
    base_cls, base_kw = (torch.optim.SGD, dict(momentum=0.9)) if opt_name == "sgd" else (torch.optim.AdamW, {})
    sam_rhos = [float(c.get("sam_rho", OPTIONAL_TRAIN["sam_rho"])) for c in cfgs]
    if any(sam_rhos):   # SAM: an optimizer per model, each ascent from its own gradient's norm
        sams = [SAM(g["params"], base_cls, rho=r, adaptive=bool(cfg0.get("sam_adaptive", False)), lr=g["lr"],
                    weight_decay=g["weight_decay"], **base_kw) for g, r in zip(groups, sam_rhos)]
        bases = [o.base_optimizer for o in sams]
    else:
        sams, bases = [], [base_cls(groups, lr=groups[0]["lr"], **base_kw)]
    generators = [torch.Generator().manual_seed(c["seed"] + 1) for c in cfgs]
    bs = int(cfg0["batch_size"])
    steps_per_epoch = -(-len(y) // bs)
    total = cfg0["epochs"] * steps_per_epoch
    scheds = [torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))) for opt in bases]  # cosine decay
    shape = models[0]
    names = [n for n, _ in shape.named_parameters()]
    loss_of = vmap(lambda weights, xb, yb: F.cross_entropy(functional_call(shape, weights, (xb,)), yb))
    for m in models:
        m.train()
    steps, steps_to_small_loss = 0, [None] * len(models)
    for _ in range(cfg0["epochs"]):
        perms = [torch.randperm(len(y), generator=g) for g in generators]
        for i in range(0, len(y), bs):
            xb, yb = [], []
            for perm, c, g in zip(perms, cfgs, generators):
                idx = perm[i:i + bs]
                xb.append(digits.augment(x[idx], g) if c["augment"] else x[idx])
                yb.append(y[idx])
            xb, yb = torch.stack(xb), torch.stack(yb)

            def backward():   # the models' gradients are independent
                weights = {n: torch.stack(ps) for n, ps in zip(names, zip(*(m.parameters() for m in models)))}
                loss_of(weights, xb, yb).sum().backward()

            for opt in bases:
                opt.zero_grad(set_to_none=True)
            backward()
            if sams:   # SAM's second pass, at each model's w + e
                for opt in sams:
                    opt.first_step(zero_grad=True)
                backward()
                for opt in sams:
                    opt.second_step()
            else:
                bases[0].step()
            for sched in scheds:
                sched.step()
            steps += 1
        for k, m in enumerate(models):
            if steps_to_small_loss[k] is None and evaluate(m, x, y)[1] <= SMALL_LOSS:
                steps_to_small_loss[k] = steps
    out = []
    for m, first_small in zip(models, steps_to_small_loss):
        m.eval()
        out.append((m, _metrics(m, x, y, xt, yt, cfg0["split_seed"], steps, first_small)))
    return out


def _metrics(model: nn.Module, x, y, xt, yt, split_seed: int, steps: int, steps_to_small_loss: int | None) -> dict:
    train_err, train_loss = evaluate(model, x, y)
    test_err, test_loss = evaluate(model, xt, yt)
    m = {"train_error": train_err, "train_loss": train_loss, "test_error": test_err,
         "test_loss": test_loss, "gap": test_err - train_err}
    ood = []
    for kind, xc in digits.corrupted_test_sets(xt, seed=split_seed).items():
        e, l = evaluate(model, xc, yt)
        m[f"ood_error_{kind}"] = e
        m[f"ood_loss_{kind}"] = l
        ood.append(e)
    m["ood_error"] = sum(ood) / len(ood)
    m["train_steps"] = steps
    if steps_to_small_loss is not None:
        m[f"steps_to_loss_{SMALL_LOSS:g}"] = steps_to_small_loss
    return m


def _train_stack(cfgs: list[dict[str, Any]], ckpt_dir: str) -> list[dict[str, Any]]:
    """Train a stack, save each model's safetensors checkpoint, return their manifest entries."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    trained = train_stack(cfgs)
    seconds = (time.perf_counter() - t0) / len(cfgs)   # the stack's time, shared
    training = {"trainer": "stacked", "stack": len(cfgs), "threads": 1, "torch": torch.__version__}
    entries = []
    for cfg, (model, metrics) in zip(cfgs, trained):
        mid = config_id(cfg)
        rel, init_rel = (os.path.join("checkpoints", mid + suffix) for suffix in (".safetensors", ".init.safetensors"))
        path, init_path = (os.path.join(ckpt_dir, mid + suffix) for suffix in (".safetensors", ".init.safetensors"))
        save_state_dict(initialized(cfg).state_dict(), init_path)
        save_state_dict(model.state_dict(), path)
        entries.append(ModelEntry(id=mid, factory=ARCHS[cfg["arch"]], kwargs=model_kwargs(cfg), checkpoint=rel,
                                  sha256=file_sha256(path), hparams=dict(cfg), metrics=metrics,
                                  train_time_s=seconds, init_checkpoint=init_rel, init_sha256=file_sha256(init_path),
                                  training=dict(training)).to_dict())
    return entries


def stacks_of(cfgs: list[dict[str, Any]], size: int = ZOO_STACK) -> list[list[dict[str, Any]]]:
    """``cfgs`` grouped by :func:`stack_key`, in order, in stacks of at most ``size``."""
    groups: dict[str, list] = {}
    for c in cfgs:
        groups.setdefault(stack_key(c), []).append(c)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def data_spec(cfgs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``data`` entry: where the sweep gets the examples sharpness is measured on."""
    keys = {(c["n_train"], c["n_test"], c["split_seed"]) for c in cfgs}
    if len(keys) != 1:
        raise ValueError("all models of one zoo must share n_train, n_test and split_seed "
                         f"(the sharpness data), got {sorted(keys)}")
    n_train, n_test, split_seed = keys.pop()
    # the name every built-in zoo records (stores are bound to it): resolved through MOVED_MODULES
    return {"factory": "sharpfast.study.digits:sharpness_data",
            "kwargs": {"n_train": n_train, "n_test": n_test, "split_seed": split_seed}}


def build_zoo(out_dir: str, spec: ZooSpec, jobs: int = 1, progress: bool = True,
              log: Callable[[str], None] = print) -> Manifest:
    """Train every configuration of ``spec`` not yet in ``out_dir``'s manifest (resumable).

    Models that differ only in learning rate, weight decay, augmentation and seed train together
    (:func:`train_stack`, :data:`ZOO_STACK` at most), a stack per worker. The manifest is rewritten
    atomically after every stack, so an interrupted run loses at most the stacks in flight; a
    rerun trains only what is missing.
    """
    from tqdm import tqdm

    cfgs = spec.configs()
    os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
    mpath = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(mpath):
        manifest = Manifest.load(mpath)
    else:
        manifest = Manifest(data=data_spec(cfgs), models=[], root=out_dir)
    if manifest.data != data_spec(cfgs):
        raise ValueError(f"{mpath} holds a zoo with other sharpness data ({manifest.data}); "
                         "use another output folder")
    have = {m.id for m in manifest.models
            if os.path.exists(os.path.join(out_dir, m.checkpoint))}
    manifest.models = [m for m in manifest.models if m.id in have]
    todo = [c for c in cfgs if config_id(c) not in have]
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="zoo", unit="model", disable=not progress or not todo)

    def done(entries: list[dict[str, Any]]) -> None:
        manifest.models.extend(ModelEntry.from_dict(e) for e in entries)
        manifest.save(mpath)
        bar.update(len(entries))

    work = stacks_of(todo)
    if jobs <= 1 or len(work) <= 1:
        before = torch.get_num_threads()
        try:
            for cfgs in work:
                done(_train_stack(cfgs, ckpt_dir))
        finally:
            torch.set_num_threads(before)  # the caller's process keeps its own setting
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from ..workers import exit_with_parent

        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                 initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_train_stack, cfgs, ckpt_dir) for cfgs in work]
            for f in as_completed(futures):
                done(f.result())
    bar.close()
    order = {config_id(c): i for i, c in enumerate(cfgs)}
    manifest.models.sort(key=lambda m: order.get(m.id, len(order)))
    manifest.save(mpath)
    if todo:
        log(f"zoo: trained {len(todo)} model(s) in {time.perf_counter() - t0:.1f}s "
            f"({len(cfgs) - len(todo)} already present) -> {mpath}")
    else:
        log(f"zoo: all {len(cfgs)} model(s) already present in {mpath}")
    return manifest
