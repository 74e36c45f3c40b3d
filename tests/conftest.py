"""Shared fixtures: the image-data helpers' cache isolation is available to every test.

Every test (and every process a test starts) writes image caches under a temporary folder
for the session, never into the user's own cache; ``isolated_cache`` gives a test a fresh one.
Ctrl-C stops the session even inside an in-process command (:mod:`conftest_signals`).
"""

import pytest
from conftest_images import isolated_cache
from conftest_signals import _record_ctrl_c, stop_on_ctrl_c

__all__ = ["_record_ctrl_c", "isolated_cache", "stop_on_ctrl_c"]


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmaml-session-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FMAML_CACHE", str(folder))
        yield folder
