"""extract_teacher memoises a tower's weights fingerprint; any change to the weights must show."""

from __future__ import annotations

import torch

from itrkit.teachers.extract import _tower_fingerprint
from tests.teachers.test_extract import CharTower


class CountingTower(CharTower):
    def __init__(self) -> None:
        super().__init__()
        self.hashes = 0

    def fingerprint(self) -> str:
        self.hashes += 1
        return super().fingerprint()


def test_memo_hashes_once_and_follows_every_kind_of_weight_change() -> None:
    t = CountingTower()
    first = _tower_fingerprint(t)
    assert _tower_fingerprint(t) == first == t.fingerprint() and t.hashes == 2  # memo hit: no 3rd hash
    with torch.no_grad():
        t.lin.weight.add_(1.0)  # in-place (an optimiser step)
    second = _tower_fingerprint(t)
    assert second != first and second == CharTower.fingerprint(t)
    t.load_state_dict({k: v * 0 for k, v in t.state_dict().items()})  # copy_ into the same storage
    third = _tower_fingerprint(t)
    assert third not in (first, second)
    t.lin.weight = torch.nn.Parameter(torch.ones(8, 26))  # a new tensor
    assert _tower_fingerprint(t) not in (first, second, third)
    t.spec = {"name": "other"}  # the spec is part of the fingerprint too
    assert _tower_fingerprint(t) == CharTower.fingerprint(t)
