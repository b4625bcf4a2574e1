"""What every strict check shares."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """The strict tier runs beside other models' checks (xdist workers, other jobs) on few cores."""


@pytest.fixture(scope="module")
def generation_model(model_spec) -> None:
    """Skips a generation check for a pooling model (its strict checks are test_pooling's)."""
    if model_spec.task != "generate":
        pytest.skip(f"a pooling model (task={model_spec.task!r}): it generates no text; its strict checks are "
                    f"test_pooling's")
