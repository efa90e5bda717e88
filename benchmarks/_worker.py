"""Run one measurement in a fresh process: ``python -m benchmarks._worker '<json spec>'``.

The spec has the keys of :class:`benchmarks.common.Point` plus impl, device, warmup, repeats,
seed, budget_bytes and paired_flops (CPU: after the measurement, also ``benchmarks.common.paired_floor``
against that many FLOPs, as ``result["paired"]``). The result of :func:`benchmarks.common.measure` is printed as one line
``RESULT <json>`` on stdout. Used by ``benchmarks.compare`` on CPU, where peak RSS is per process.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    from benchmarks.common import Point, measure

    fields = ("sweep", "P", "G", "T", "D", "V", "dtype", "model")
    point = Point(**{k: spec[k] for k in fields if k in spec})
    result = measure(spec["impl"], point, spec.get("device", "cpu"), warmup=spec.get("warmup", 1),
                     repeats=spec.get("repeats", 3), seed=spec.get("seed", 0),
                     budget_bytes=spec.get("budget_bytes"))
    if spec.get("paired_flops") and result["status"] == "ok" and spec.get("device", "cpu") == "cpu":
        from benchmarks.common import paired_floor

        result["paired"] = paired_floor(spec["impl"], point, float(spec["paired_flops"]), seed=spec.get("seed", 0),
                                        pairs=int(spec.get("pairs", 7)))
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
