"""A replica's recent request rate and latency, for the registry and recommendations."""

from __future__ import annotations

import time
from collections import deque


class LoadMeter:
    """Requests of the last ``window_s`` seconds: rate, p50 and p99, errors."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 20_000) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, float, bool]] = deque(maxlen=max_samples)
        self.total = 0

    def record(self, duration_s: float, status: int) -> None:
        self.total += 1
        self.samples.append((time.monotonic(), duration_s, status >= 500))

    def snapshot(self) -> dict[str, float]:
        cutoff = time.monotonic() - self.window_s
        while self.samples and self.samples[0][0] < cutoff:
            self.samples.popleft()
        n = len(self.samples)
        if not n:
            return {"rps": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "errors": 0}
        span = max(1.0, min(self.window_s, time.monotonic() - self.samples[0][0]))
        durations = sorted(s[1] for s in self.samples)
        return {
            "rps": round(n / span, 2),
            "p50_ms": round(durations[n // 2] * 1000, 2),
            "p99_ms": round(durations[min(n - 1, int(n * 0.99))] * 1000, 2),
            "errors": sum(1 for s in self.samples if s[2]),
        }
