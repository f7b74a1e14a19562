from __future__ import annotations

from collections.abc import Iterator

import pytest

from .programs import Programs


@pytest.fixture
def programs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Programs]:
    owner = Programs(tmp_path_factory.mktemp("programs"))
    try:
        yield owner
    finally:
        owner.stop_all()


@pytest.fixture(scope="module")
def module_programs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Programs]:
    owner = Programs(tmp_path_factory.mktemp("module-programs"))
    try:
        yield owner
    finally:
        owner.stop_all()
