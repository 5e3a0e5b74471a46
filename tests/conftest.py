import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """Eight small trained MLPs (2 epochs on 256 digits), shared by the tests that only read them."""
    from sharpfast.study import zoo

    spec = zoo.ZooSpec({"lr": [0.5, 2.0], "batch_size": [32, 128], "width": [8, 16]},
                       {"arch": "mlp", "epochs": 2, "n_train": 256})
    d = tmp_path_factory.mktemp("zoo")
    zoo.build_zoo(str(d), spec, progress=False, log=lambda s: None)
    return str(d)
