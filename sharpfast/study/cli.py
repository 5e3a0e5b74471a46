"""The ``sharpfast`` command line: ``zoo``, ``sweep``, ``report``, ``run`` (all three), ``definitions``,
``doctor``.

    sharpfast run --out sharpfast-out             # the main job: zoo -> sweep -> report
    sharpfast zoo --out zoo --preset default --jobs 2
    sharpfast sweep --zoo zoo --store results.db --preset default [--config defs.yaml] [--executor ray]
    sharpfast report --store results.db --out report
    sharpfast definitions --preset paper          # list a preset's definitions
    sharpfast esd --zoo zoo --out report          # spectral densities of the best and worst checkpoints
    sharpfast landscape --zoo zoo --out report    # their loss landscapes (then report --out report shows them)
    sharpfast doctor [--device cuda]              # build, devices and the fused ops' self-test

Exit status: 0 done; 2 an error before any work (bad input, a store or zoo that cannot serve);
3 (``sweep``, ``run``) done, but rows computed by this run failed (their errors are stored and the
report counts them), so ``sharpfast sweep ... && sharpfast report ...`` notices; 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM): both keep what finished and say so.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Sequence

from . import definitions as defs_mod
from .zoo.checkpoints import CheckpointError, Manifest, ManifestError
from .definitions import ConfigError, Definition
from .store import StoreError


DEFAULT_JOBS = max(1, min(os.cpu_count() or 1, 8))
ROWS_FAILED = 3   # the exit status of a sweep (or run) in which rows failed


class CLIError(ValueError):
    """A command that cannot do what it was asked (exit status 2)."""


# ----------------------------------------------------------------------------- helpers

def _number(kind: type, low: float, low_open: bool = False):
    """An argparse type: a ``kind`` number at least ``low`` (above it with ``low_open``), refused by name."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < low or (low_open and value == low) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text}")
        return value
    return parse


POSITIVE, NON_NEGATIVE = _number(int, 1), _number(int, 0)


def _stack(text: str) -> int | None:
    """``--stack``: ``auto`` (None) or a positive integer."""
    return None if text == "auto" else POSITIVE(text)


def _device(spec: str) -> str:
    """A device the sweep can run on, or a CLIError naming why not."""
    import torch

    if spec == "auto":
        return spec
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise CLIError(f"--device {spec!r} is not a device ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {spec!r}: CUDA is not available on this machine (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {spec!r}: sharpfast runs on cpu or cuda")
    return spec


def _zoo_spec(args: argparse.Namespace):
    from .zoo import DEFAULT_TRAIN, OPTIONAL_TRAIN, ZOO_PRESETS, ZooSpec

    if args.grid:
        import yaml

        if not os.path.isfile(args.grid):
            raise ConfigError(f"zoo grid {args.grid!r} does not exist")
        try:
            with open(args.grid, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"zoo grid {args.grid!r} cannot be parsed: {e}") from e
        if not isinstance(raw, dict) or set(raw) - {"factors", "fixed"}:
            raise ConfigError(f"zoo grid {args.grid!r}: expected a mapping with 'factors' and optional 'fixed'")
        factors, fixed = raw.get("factors") or {}, raw.get("fixed") or {}
        if not isinstance(factors, dict) or not all(isinstance(v, list) and v for v in factors.values()):
            raise ConfigError(f"zoo grid {args.grid!r}: 'factors' must map names to non-empty lists")
        spec = ZooSpec(factors, fixed)
    else:
        if args.zoo_preset not in ZOO_PRESETS:
            raise ConfigError(f"unknown zoo preset {args.zoo_preset!r}; available: {sorted(ZOO_PRESETS)}")
        spec = ZOO_PRESETS[args.zoo_preset]
    fixed = dict(spec.fixed)
    if args.epochs is not None:
        fixed["epochs"] = args.epochs
    if args.seed is not None:
        fixed["seed"] = args.seed
    spec = ZooSpec(spec.factors, fixed)
    known = set(DEFAULT_TRAIN) | set(OPTIONAL_TRAIN)
    bad = (set(spec.factors) | set(spec.fixed)) - known
    if bad:
        raise ConfigError(f"unknown zoo hyperparameter(s) {sorted(bad)}; known: {sorted(known)}")
    for cfg in spec.configs():   # a grid file's counts, as the flags' are checked
        for name in ("epochs", "batch_size", "width", "n_train"):
            v = cfg[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"zoo hyperparameter {name} must be a positive integer, got {v!r}")
    return spec


# the definition flags and the kinds that take them: a flag none of the given kinds takes is an error
_FLAG_KINDS = {"rho": ("avg", "max", "geodesic"), "norm": ("avg", "max"), "solver": ("max",), "n_samples": ("avg",),
               "n_iters": ("max", "geodesic"), "n_restarts": ("max", "geodesic"), "rand_init": ("max", "geodesic"),
               "init": ("max", "geodesic"), "metric": ("geodesic",)}
_FLAGS_OF_KIND = ("m", "def_seed")   # every kind's


def _check_definition_flags(args: argparse.Namespace) -> None:
    """Refuse definition flags that would change nothing: given without --kind, or with kinds none
    of which takes them (each flag applies to those of the given kinds that take it)."""
    flag = lambda name: "--" + name.replace("_", "-")
    given = [name for name in (*_FLAG_KINDS, *_FLAGS_OF_KIND) if getattr(args, name) not in (None, False, [])]
    if not args.kind:
        if given:
            raise ConfigError(f"{flag(given[0])} is only used with --kind (presets and configs keep their own "
                              "settings; to change them, write a config)")
        return
    for name in given:
        takers = _FLAG_KINDS.get(name)
        if takers is not None and not set(takers) & set(args.kind):
            raise ConfigError(f"{flag(name)} is for --kind {'/'.join(takers)}: --kind {' '.join(args.kind)} does not "
                              "take it" + (" (geodesic sharpness is a ball of the l2 norm in its metric)"
                                           if name == "norm" and defs_mod.GEODESIC_KIND in args.kind else ""))


def _definitions(args: argparse.Namespace, default_preset: str | None = "default") -> list[Definition]:
    out: list[Definition] = []
    for path in args.config or []:
        out += defs_mod.load_config(path)
    for name in args.preset or []:
        out += defs_mod.preset(name)
    _check_definition_flags(args)
    if args.kind:
        if not args.rho and any(k in defs_mod.SHARPNESS_KINDS + (defs_mod.GEODESIC_KIND,) for k in args.kind):
            raise ConfigError("--kind avg/max/geodesic needs --rho (one or more radii)")
        common: dict[str, Any] = {}
        for flag, field_name in (("m", "m"), ("n_iters", "n_iters"), ("n_samples", "n_samples"),
                                 ("def_seed", "seed"), ("n_restarts", "n_restarts")):
            if getattr(args, flag) is not None:
                common[field_name] = getattr(args, flag)
        if args.rand_init:
            common["rand_init"] = True
        if args.init is not None:
            common["init"] = args.init
        nl = {"none": False, "norm": "norm", "std": "std"}[args.normalize_logits]
        adaptives = [True, False] if args.adaptive == "both" else [args.adaptive == "true"]
        for kind in args.kind:
            if kind == defs_mod.MEASURE_KIND:
                raise ConfigError("the Jiang et al. measures are definitions of their own: use --preset jiang, "
                                  "or a config with {kind: measure, measure: NAME}")
            if kind in defs_mod.CURVATURE_KINDS:
                curv = {k: v for k, v in common.items() if k in ("m", "seed")}
                out += [Definition.from_dict(dict(kind=kind, adaptive=a, normalize_logits=nl, **curv), "flags")
                        for a in adaptives]
                continue
            if kind == defs_mod.GEODESIC_KIND:
                geo = {k: v for k, v in common.items() if k in ("m", "seed", "n_iters", "n_restarts", "rand_init",
                                                                 "init")}
                out += [Definition.from_dict(dict(kind=kind, metric=metric, rho=rho, adaptive=a, normalize_logits=nl,
                                                  **geo), "flags")
                        for metric in args.metric or ["mix"] for a in adaptives for rho in args.rho]
                continue
            solvers = (args.solver or ["published"]) if kind == "max" else [None]
            for norm in args.norm or ["linf"]:
                for adaptive in adaptives:
                    for rho in args.rho:
                        for solver in solvers:
                            extra = dict(solver=solver) if solver else {}
                            out.append(Definition.from_dict(dict(kind=kind, norm=norm, rho=rho, adaptive=adaptive,
                                                                 normalize_logits=nl, **common, **extra), "flags"))
    if not out:
        if default_preset is None:
            raise ConfigError("no definitions: give --preset, --config or --kind/--norm/--rho")
        out = defs_mod.preset(default_preset)
    return defs_mod.with_overrides(defs_mod.dedupe(out), n_examples=args.n_examples)


def _add_definition_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sharpness definitions (config, presets and flags are combined)")
    g.add_argument("--config", action="append", metavar="FILE",
                   help="YAML/TOML file with 'definitions' (and optional 'defaults', 'preset'); repeatable")
    g.add_argument("--preset", action="append", metavar="NAME",
                   help=f"definition preset, repeatable: {', '.join(sorted(defs_mod.PRESETS))} "
                        "(default: 'default' when nothing else is given)")
    g.add_argument("--kind", nargs="+", choices=defs_mod.KINDS, help="avg (average-case), max (worst-case), geodesic (worst-case in the GL-invariant geometry of attention), "
                        "and/or the curvature measures trace, lambda_max, adam, renyi")
    g.add_argument("--norm", nargs="+", choices=defs_mod.NORMS, help="with --kind (default linf)")
    g.add_argument("--rho", nargs="+", type=float, help="with --kind: one or more radii")
    g.add_argument("--adaptive", choices=["true", "false", "both"], default="true", help="with --kind")
    g.add_argument("--normalize-logits", choices=["none", "norm", "std"], default="none", help="with --kind")
    g.add_argument("--m", type=POSITIVE, help="with --kind: examples per m-sharpness batch (default 128)")
    g.add_argument("--n-iters", type=POSITIVE, help="with --kind: APGD iterations (default 20)")
    g.add_argument("--n-samples", type=POSITIVE, help="with --kind: noise draws per batch (default 20)")
    g.add_argument("--n-restarts", type=POSITIVE, help="with --kind: APGD restarts (default 1)")
    g.add_argument("--rand-init", action="store_true", help="with --kind: APGD random start")
    g.add_argument("--solver", nargs="+", choices=defs_mod.SOLVERS,
                   help="with --kind max: the worst-case solver(s), published APGD and/or scaled (default published)")
    g.add_argument("--metric", nargs="+", choices=defs_mod.METRICS,
                   help="with --kind geodesic: the GL-invariant metric(s), mix and/or inv (default mix)")
    g.add_argument("--init", choices=defs_mod.INITS, help="with --kind max: where APGD starts (default zero)")
    g.add_argument("--def-seed", type=NON_NEGATIVE, help="with --kind: the definitions' seed (default 0)")
    g.add_argument("--n-examples", type=POSITIVE,
                   help="override every definition's number of examples (a multiple of its m); without it, a "
                        "definition asking for more than the zoo's data provide uses the largest multiple of every "
                        "definition's m that they do")


def _add_exec_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: in this process; ray: one Ray task per stack of checkpoints")
    g.add_argument("--stack", type=_stack, default=None, metavar="K",
                   help="checkpoints of one architecture evaluated together, K per pass (sharpfast.evaluate_many); "
                        "auto (default): each architecture's checkpoints split over the workers, the models per "
                        "pass chosen by evaluate_many; 1: one checkpoint per pass. The values stored are the "
                        "same for every K")
    g.add_argument("--address", help="Ray cluster address (default: start a local cluster)")
    g.add_argument("--num-cpus", type=POSITIVE, help="CPUs of the local Ray cluster (default: all)")
    g.add_argument("--cpus-per-task", type=_number(float, 0, low_open=True),
                   help="Ray: CPUs requested per task (default 1)")
    g.add_argument("--gpus-per-task", type=_number(float, 0),
                   help="Ray: GPUs requested per task (default 1 when the cluster has GPUs; 0.25 shares one)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=POSITIVE, default=1,
                   help="torch intra-op threads per evaluation (default 1; identical values on every executor)")
    g.add_argument("--backend", choices=["auto", "reference", "fused"], default="auto")
    g.add_argument("--no-retry-errors", action="store_true", help="keep rows that failed before instead of retrying")
    g.add_argument("--mix-zoos", action="store_true",
                   help="allow a store written for another zoo (its rows and this zoo's then share one report)")
    if "--jobs" not in p._option_string_actions:
        g.add_argument("--jobs", type=POSITIVE, default=DEFAULT_JOBS,
                       help=f"local executor: worker processes (default min(CPUs, 8) = {DEFAULT_JOBS}; 1 = in this process)")
    g.add_argument("--limit", type=POSITIVE, help="evaluate at most this many checkpoints (smoke runs)")


def _add_zoo_flags(p: argparse.ArgumentParser, preset_flag: str = "--preset") -> None:
    from .zoo import ZOO_PRESETS

    p.add_argument(preset_flag, dest="zoo_preset", default="default",
                   help=f"zoo grid preset: {', '.join(f'{k} ({len(v.configs())} models)' for k, v in ZOO_PRESETS.items())}")
    p.add_argument("--grid", metavar="FILE", help="YAML zoo grid {factors: {name: [values]}, fixed: {...}}")
    p.add_argument("--epochs", type=POSITIVE, help="override the number of training epochs")
    p.add_argument("--seed", type=NON_NEGATIVE, help="override the training seed")
    p.add_argument("--jobs", type=POSITIVE, default=DEFAULT_JOBS,
                   help=f"worker processes for training (and, in `run`, the local sweep); default min(CPUs, 8) = {DEFAULT_JOBS}")


def _add_report_flags(p: argparse.ArgumentParser) -> None:
    from .analysis.report import TARGETS

    p.add_argument("--target", choices=sorted(TARGETS), default="test_error",
                   help="target of the granulated tau / Psi (default test_error)")
    p.add_argument("--color-by", help="hyperparameter that colors the scatter plots (default: sam_rho, else lr, where it varies)")
    p.add_argument("--n-boot", type=NON_NEGATIVE, default=1000, help="bootstrap resamples for the CIs (0: none)")
    p.add_argument("--max-train-error", type=_number(float, 0),
                   help="only models with train error <= this (the paper's near-minimum selection, e.g. 0.01)")
    p.add_argument("--no-plots", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    import sharpfast

    p = argparse.ArgumentParser(prog="sharpfast", description="Sharpness of neural-network minima vs "
                                "generalization over model zoos (Andriushchenko et al., ICML 2023).",
                                epilog=f"exit status: 0 done; 2 an error before any work; {ROWS_FAILED} (sweep, run) "
                                "done, but rows of this run failed; 130 interrupted; 143 terminated")
    p.add_argument("--version", action="version", version=f"sharpfast {sharpfast.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("zoo", help="train the built-in digits model zoo")
    q.add_argument("--out", required=True, help="zoo folder (manifest.json + checkpoints/)")
    _add_zoo_flags(q)
    q.add_argument("--quiet", action="store_true")

    q = sub.add_parser("sweep", help="checkpoints x definitions -> results store (resumable)")
    q.add_argument("--zoo", required=True, help="zoo folder or manifest.json")
    q.add_argument("--store", help="SQLite results file (default: <zoo>/results.db)")
    _add_definition_flags(q)
    _add_exec_flags(q)
    q.add_argument("--quiet", action="store_true")

    q = sub.add_parser("report", help="Kendall tau / Psi table, plots, markdown + HTML")
    q.add_argument("--store", required=True)
    q.add_argument("--out", help="folder for report.md/.html, results.csv, plots/ (default: print only)")
    _add_report_flags(q)

    q = sub.add_parser("run", help="the main job: train the zoo, sweep, report")
    q.add_argument("--out", default="sharpfast-out", help="output folder (default sharpfast-out)")
    _add_zoo_flags(q, "--zoo-preset")
    _add_definition_flags(q)
    _add_exec_flags(q)
    _add_report_flags(q)
    q.add_argument("--quiet", action="store_true")

    q = sub.add_parser("definitions", help="list the definitions a preset/config/flags give")
    _add_definition_flags(q)
    q.add_argument("--yaml", action="store_true", help="print them as an editable YAML config")
    q.add_argument("--zoo", help="the zoo a sweep would measure: the definitions (and keys) it would store, their "
                                 "examples fitted to the zoo's data as the sweep fits them")

    q = sub.add_parser("landscape", help="loss landscapes of chosen checkpoints (shown by `report --out` the same DIR)")
    q.add_argument("--zoo", required=True, help="zoo folder or manifest.json")
    q.add_argument("--out", required=True, help="folder for the plots, h5 files and landscapes.json")
    q.add_argument("--ids", nargs="+", help="checkpoint ids (default: the best and the worst by test error)")
    q.add_argument("--x", nargs=3, type=float, default=[-1.0, 1.0, 51], metavar=("MIN", "MAX", "NUM"),
                   help="the first axis (default -1 1 51)")
    q.add_argument("--y", nargs=3, type=float, metavar=("MIN", "MAX", "NUM"), help="a second axis: a 2-D landscape")
    q.add_argument("--kind", choices=["random", "hessian"], default="random",
                   help="random filter-normalized directions, or the top Hessian eigenvectors")
    q.add_argument("--norm", choices=["auto", "filter", "layer", "weight", "dfilter", "dlayer", "none"], default="auto")
    q.add_argument("--seed", type=NON_NEGATIVE, default=0, help="the random directions' Philox seed")
    q.add_argument("--n-examples", type=POSITIVE,
                   help="examples (a multiple of --m; default 512, or the most a smaller zoo's data hold)")
    q.add_argument("--m", type=POSITIVE, default=128, help="examples per batch")

    q = sub.add_parser("esd", help="eigenvalue spectral densities of chosen checkpoints on one figure")
    q.add_argument("--zoo", required=True, help="zoo folder or manifest.json")
    q.add_argument("--out", required=True, help="folder for esd.png")
    q.add_argument("--ids", nargs="+", help="checkpoint ids (default: the best and the worst by test error)")
    q.add_argument("--adaptive", action="store_true", help="the density of C H C with c = |w| (default: H)")
    q.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    q.add_argument("--n-examples", type=POSITIVE,
                   help="examples (a multiple of --m; default 512, or the most a smaller zoo's data hold)")
    q.add_argument("--m", type=POSITIVE, default=128, help="examples per m-batch")

    q = sub.add_parser("manifest", help="a zoo manifest from a table of your own models (CSV, one row per model)")
    q.add_argument("--table", required=True, metavar="FILE.csv",
                   help="columns: id, checkpoint (safetensors), factory, factory_kwargs (JSON), init_checkpoint, "
                        "hp_* (hyperparameters), metrics (test_error, train_error, ood_error*, ...)")
    q.add_argument("--data", required=True, metavar="MODULE:FUNCTION",
                   help="the data factory: FUNCTION(n_examples=N, **kwargs) -> (x, y), x a tensor or a dict")
    q.add_argument("--data-kwargs", default="{}", metavar="JSON", help="keyword arguments of the data factory")
    q.add_argument("--out", required=True, help="folder for manifest.json (then: sharpfast sweep --zoo DIR)")

    q = sub.add_parser("doctor", help="the build, the devices and the self-test of every fused op")
    q.add_argument("--device", help="self-test only this device (default: every device)")
    return p


# ----------------------------------------------------------------------------- commands

def cmd_zoo(args: argparse.Namespace) -> None:
    from .zoo import build_zoo

    build_zoo(args.out, _zoo_spec(args), jobs=args.jobs, progress=not args.quiet)


def _sweep(args: argparse.Namespace, zoo_path: str, store_path: str) -> int:
    """The sweep; its exit status (:data:`ROWS_FAILED` where rows of this run failed)."""
    from .sweep import run_sweep

    if args.executor != "ray":   # Ray's settings would change nothing: say so rather than run locally
        ray_only = [f for f in ("address", "num_cpus", "cpus_per_task", "gpus_per_task")
                    if getattr(args, f) is not None]
        if ray_only:
            raise ConfigError(f"--{ray_only[0].replace('_', '-')} is for --executor ray; without it the sweep runs "
                              "in this process (--jobs worker processes)")
    manifest = Manifest.load(zoo_path)
    defs = _definitions(args)
    summary = run_sweep(manifest, defs, store_path, executor=args.executor, device=_device(args.device),
                        threads=args.threads, backend=args.backend, jobs=args.jobs, retry_errors=not args.no_retry_errors,
                        progress=not args.quiet, address=args.address, num_cpus=args.num_cpus, limit=args.limit,
                        cpus_per_task=1.0 if args.cpus_per_task is None else args.cpus_per_task,
                        gpus_per_task=args.gpus_per_task,
                        fit_examples=args.n_examples is None, mix_zoos=args.mix_zoos, stack=args.stack)
    print(summary.text(store_path))
    if summary.errors:
        print(f"sharpfast sweep: {summary.errors} row(s) of this run failed (stored with their errors; "
              f"`sharpfast report` counts them); exit status {ROWS_FAILED}", file=sys.stderr)
        return ROWS_FAILED
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    store = args.store or os.path.join(args.zoo if os.path.isdir(args.zoo) else os.path.dirname(args.zoo),
                                       "results.db")
    return _sweep(args, args.zoo, store)


def _report(args: argparse.Namespace, store: str, out: str | None) -> None:
    from .analysis.report import build_report

    try:
        r = build_report(store, out, target=args.target, color_by=args.color_by, n_boot=args.n_boot,
                         plots=not args.no_plots, max_train_error=args.max_train_error)
    except ValueError as e:   # an argument the store cannot serve (an unknown --color-by)
        raise CLIError(str(e)) from None
    print(r.markdown())
    if out:
        n_png = sum(f.endswith(".png") for f in r.files)
        print(f"\nreport: wrote {os.path.join(out, 'report.md')}, report.html, results.csv and {n_png} plot(s) "
              f"in {os.path.join(out, 'plots')}")


def cmd_report(args: argparse.Namespace) -> None:
    _report(args, args.store, args.out)


def cmd_run(args: argparse.Namespace) -> int:
    from .zoo import build_zoo

    t0 = time.perf_counter()
    zoo_dir = os.path.join(args.out, "zoo")
    store = os.path.join(args.out, "results.db")
    t = time.perf_counter()
    build_zoo(zoo_dir, _zoo_spec(args), jobs=args.jobs, progress=not args.quiet)
    t_zoo = time.perf_counter() - t
    t = time.perf_counter()
    status = _sweep(args, zoo_dir, store)
    t_sweep = time.perf_counter() - t
    t = time.perf_counter()
    print()
    _report(args, store, args.out)
    t_report = time.perf_counter() - t
    print(f"run: done in {time.perf_counter() - t0:.1f}s (zoo {t_zoo:.1f}s, sweep {t_sweep:.1f}s, "
          f"report {t_report:.1f}s); rerun to resume, nothing is recomputed")
    return status


def cmd_definitions(args: argparse.Namespace) -> None:
    defs = _definitions(args)
    fitted = None
    if args.zoo and args.n_examples is None:   # the sweep's own fitting, so the keys are the ones it stores
        from .definitions import fit_to_data
        defs, fitted = fit_to_data(Manifest.load(args.zoo), defs)
    if args.yaml:
        import yaml

        print(yaml.safe_dump({"definitions": [d.canonical() for d in defs]}, sort_keys=False,
                             default_flow_style=None, width=200), end="")
        return
    print(f"{len(defs)} definition(s):")
    for d in defs:
        print(f"  {d.key}  {d.name}")
    if fitted:
        print(f"(as a sweep on {args.zoo} stores them: {fitted})")
    elif not args.zoo:
        print("(keys for the examples asked; a sweep on a zoo whose data hold fewer stores them fitted: "
              "`sharpfast definitions --zoo ZOO` prints those)")


def cmd_esd(args: argparse.Namespace) -> None:
    from .analysis.esd import plot_esd

    print(f"esd: wrote {plot_esd(args.zoo, args.out, args.ids, args.n_examples, args.m, args.adaptive, args.curvature)}")


def cmd_landscape(args: argparse.Namespace) -> None:
    from .analysis.landscapes import compute

    axis = lambda a: None if a is None else (a[0], a[1], _grid_points(a[2]))
    compute(args.zoo, args.out, args.ids, args.n_examples, args.m, axis(args.x), axis(args.y), args.kind,
            None if args.norm == "none" else args.norm, args.seed)
    print(f"landscape: `sharpfast report --store STORE --out {args.out}` shows them beside the sharpness values")


def _grid_points(num: float) -> int:
    if num != int(num) or num < 1:
        raise ConfigError(f"a grid's NUM must be a positive integer, got {num:g}")
    return int(num)


def cmd_doctor(args: argparse.Namespace) -> None:
    from ..doctor import run

    if args.device is not None:
        _device(args.device)
    if not run(args.device):
        raise CLIError("the fused backend cannot run on every device asked for (see above); backend='auto' "
                       "uses the pure-PyTorch reference there")


def cmd_manifest(args: argparse.Namespace) -> None:
    from .zoo.table import write_manifest

    try:
        kwargs = json.loads(args.data_kwargs)
    except json.JSONDecodeError as e:
        raise CLIError(f"--data-kwargs is not JSON: {e}") from None
    path = write_manifest(args.table, args.data, args.out, kwargs)
    print(f"manifest: wrote {path} ({len(Manifest.load(path).models)} models); sweep it with "
          f"`sharpfast sweep --zoo {args.out}`")


COMMANDS = {"zoo": cmd_zoo, "sweep": cmd_sweep, "report": cmd_report, "run": cmd_run,
            "definitions": cmd_definitions, "esd": cmd_esd, "landscape": cmd_landscape, "manifest": cmd_manifest, "doctor": cmd_doctor}


def _check_out_folder(out: str | None) -> None:
    """Every command's --out is a folder it writes into: a file there is refused before any work."""
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out!r} is a file, not a folder: give a folder to write into (it is created if "
                       "missing)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as the interrupt every command already cleans up after (claims released,
    finished rows kept)."""


def _terminated(signum, frame):
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        _check_out_folder(getattr(args, "out", None))
        status = COMMANDS[args.command](args) or 0
        sys.stdout.flush()
    except (ConfigError, ManifestError, CheckpointError, StoreError, CLIError) as e:
        print(f"sharpfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"sharpfast {args.command}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; rerun "
              "to resume", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(e, Terminated) else 130
    except BrokenPipeError:   # `sharpfast definitions | head`: the reader left; nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's recipe: no second error at exit
        return 0
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return status


if __name__ == "__main__":
    sys.exit(main())
