"""Log every autotuning decision of a run: kernel, key, each config's time, the winner.

The GPU check keeps only the winners' speed otherwise; which configs lost, and by how much, is
what the next change to the config tables needs. Each decision is appended to a JSON-lines file
as soon as it is made, so a run cut short keeps what it tuned.
"""
import json
import math
from typing import Callable, Optional


def _ms(timing) -> Optional[float]:
    t = timing[0] if isinstance(timing, (list, tuple)) else timing  # do_bench quantiles: median first
    return float(t) if math.isfinite(float(t)) else None  # inf: the config failed (e.g. out of resources)


def install(path: str) -> Callable[[], None]:
    """Wrap `triton.runtime.autotuner.Autotuner.run` to append decisions to `path`; returns undo."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run

    def run(self, *args, **kwargs):
        before = set(self.cache)
        out = original(self, *args, **kwargs)
        new = [k for k in self.cache if k not in before]
        if new:
            with open(path, "a", encoding="utf-8") as fh:
                for key in new:
                    fh.write(json.dumps({
                        "kernel": self.base_fn.__name__,
                        "key": [str(k) for k in key],
                        "key_names": list(self.keys),  # the key's leading values; argument dtypes follow
                        "best": str(self.cache[key]),
                        "ms": {str(c): _ms(t) for c, t in getattr(self, "configs_timings", {}).items()},
                    }, sort_keys=True) + "\n")
        return out

    Autotuner.run = run

    def undo() -> None:
        Autotuner.run = original

    return undo
