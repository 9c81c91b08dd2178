"""Every test starts from the same random state, so a failure can be replayed exactly."""

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_torch():
    torch.manual_seed(0)
