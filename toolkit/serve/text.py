"""Stop strings on generated text: the text ends just before the first stop string, and no piece passed on
is ever the start of one (that tail is held back until it is clearly not a stop)."""

from __future__ import annotations


class StopText:
    def __init__(self, stops: tuple[str, ...] | list[str] = ()):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        if not self.stops:
            return piece
        buf = self.pending + piece
        cuts = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self.pending = True, ""
            return buf[: min(cuts)]
        hold = max(self._partial(buf, s) for s in self.stops)
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of `stop`."""
        for k in range(min(len(stop) - 1, len(buf)), 0, -1):
            if buf.endswith(stop[:k]):
                return k
        return 0

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
