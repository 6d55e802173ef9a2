import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _registry_left_as_found():
    """Methods a test registers are removed after it, so list_methods() only ever shows real ones."""
    from attnpatch.registry import method_names, unregister_method

    before = set(method_names())
    yield
    for name in set(method_names()) - before:
        unregister_method(name)
