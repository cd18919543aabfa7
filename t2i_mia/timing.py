"""Phase timing for long jobs: ``with timer.phase("generate"): ...`` logs the phase and adds
its wall seconds to ``timer.timings`` (the report's ``timings_s``)."""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger(__name__)


class Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        log.info("phase %s ...", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.timings[name] = self.timings.get(name, 0.0) + dt
            log.info("phase %s done in %.1f s", name, dt)
