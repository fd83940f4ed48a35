"""Every test here needs torch; without the extra they are skipped, not failed."""

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _one_thread():
    # The machine is shared: tiny models gain nothing from more threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
