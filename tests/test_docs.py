"""The examples users copy run: the public functions' docstring example and the README's."""
import doctest
import os
import re

import sharpfast.api

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_the_docstring_examples_run():
    failed, attempted = doctest.testmod(sharpfast.api, optionflags=doctest.ELLIPSIS)
    assert attempted >= 4 and failed == 0


def test_the_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), flags=re.S)
    usage = next(b for b in blocks if "worst_case_sharpness(" in b and "compat" not in b)
    namespace = {}
    exec(compile(usage, "README.md", "exec"), namespace)
    assert namespace["worst"].sharpness > 0 and len(namespace["avg"].per_batch) == 4
    solvers = next(b for b in blocks if 'solver="scaled"' in b)
    exec(compile(solvers, "README.md", "exec"), namespace)
    r = namespace["r"]
    assert r.solver == "scaled" and r.quadratic_model > 0 and len(r.restarts_improved) == 4
    curvature = next(b for b in blocks if "hessian_trace(" in b)
    exec(compile(curvature, "README.md", "exec"), namespace)
    assert len(namespace["top"].values) == 3 and namespace["tr"].stderr > 0
