"""What every KV-cache decoder shares, without torch (the numpy decoder of toolkit.models.llama_cpu loads without
it): a cache of max_len positions, and `logits(ids)` that runs only the tokens not in the cache yet, so a prompt
prefix already there (a chat's earlier turns) is reused. A subclass writes `_forward(new, pos)`: feed the tokens
`new` at positions pos.. into the cache, return the logits after the last."""

from __future__ import annotations

from typing import Sequence


def common_prefix(a: list[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == list(b[:n]):
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCacheDecoder:
    sliding = False

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.done: list[int] = []  # the tokens whose keys and values are in the cache

    def _forward(self, new: list[int], pos: int):
        raise NotImplementedError

    def logits(self, ids: Sequence[int]):
        if len(ids) > self.max_len:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.max_len}")
        n = min(common_prefix(self.done, ids), len(ids) - 1)
        self.done = self.done[:n]  # an interrupted forward leaves positions >= n half-written
        out = self._forward(list(ids[n:]), n)
        self.done = list(ids)
        return out
