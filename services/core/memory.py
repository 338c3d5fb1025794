"""A process's resident memory, measured while a block runs: the figure merge and quantize jobs report and
their memory plans are checked against."""

from __future__ import annotations

import resource
import threading


class PeakRss:
    """This process's peak resident memory while the block runs (ru_maxrss is the whole life's peak, so a sampler
    thread also reads VmRSS every 50 ms)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> "PeakRss":
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())
