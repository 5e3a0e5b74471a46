"""pytest-benchmark suites: sharpfast's evaluators and the costs they are measured against.

    python -m pytest benchmarks/test_bench_sharpness.py --benchmark-only [--benchmark-group-by=param:definition]

Each definition is timed four ways on the same model and batches: ``bare`` (the passes the
algorithm cannot avoid: n_iters forward+backward or n_samples forwards per batch), ``fused``,
``reference`` and ``published`` (the published code's structure). Compare rows within a group;
``bench_sharpness.py`` turns the same measurements into the ratios of ``RESULTS.md``. Not part
of the test suite (``pytest.ini`` collects ``tests/`` only) and never asserts a time.
"""
import pytest
import torch

from benchmarks.bench_sharpness import DEFINITIONS, GPU_ONLY_BY_DEFAULT, MODELS as ALL_MODELS, contenders, digits_batches, trained

MODELS = {name: spec for name, spec in ALL_MODELS.items()
          if torch.cuda.is_available() or name not in GPU_ONLY_BY_DEFAULT}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_batches(request):
    make, n_batches = MODELS[request.param]
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return trained(make(), device), digits_batches(n_batches, 128, device)


@pytest.mark.parametrize("contender", ["bare", "fused", "reference", "published"])
@pytest.mark.parametrize("definition", DEFINITIONS, ids=[d[0].replace(" ", "-") for d in DEFINITIONS])
def test_sharpness(benchmark, model_and_batches, definition, contender):
    model, batches = model_and_batches
    _, kind, kw = definition
    fn = contenders(model, batches, kind, kw)[contender]
    if torch.cuda.is_available():
        run = fn
        fn = lambda: (run(), torch.cuda.synchronize())
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
