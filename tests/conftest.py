"""Suite-wide pytest setup.

The repository root is the ComfyUI node package: its ``__init__.py`` (the ``comfy_entrypoint``)
imports ComfyUI modules, which exist only inside a ComfyUI process. Because of that ``__init__.py``,
pytest collects the root as a test *package* and imports it before the first test runs, which would
make every test error with "No module named 'comfy_api'". pytest offers no hook to collect the
root folder differently (``pytest_collect_directory`` is asked with the root's parent's plugins, and
``--confcutdir`` breaks runs from a subfolder), so the root package's setup, whose only job is that
import and its ``setup_module``, is skipped here. Tests never need it: ``pid_core`` is imported as a
top-level package (``pythonpath``), and the nodes are tested inside a real ComfyUI (tests/comfy).
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        for node in item.listchain():
            if isinstance(node, pytest.Package) and node.path == config.rootpath:
                node.setup = lambda: None
