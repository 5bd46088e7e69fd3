"""Every docstring example in the package runs and gives the numbers it shows.

Modules whose tests also run their own doctests are run again here; the point is that no
module's examples can go stale unnoticed because no test happened to name it.
"""

import doctest
import importlib
import pkgutil

import pytest

import edgekiln

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(edgekiln.__path__, prefix="edgekiln.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", ["edgekiln", *MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
