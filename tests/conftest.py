import os

import pytest
import torch

# Two cores on CI: keep intra-op threads predictable and tests deterministic.
torch.set_num_threads(int(os.environ.get("POSTTRAIN_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
