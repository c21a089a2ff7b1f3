"""The throughput benchmark's modes: mode name -> a Preset (the engine's settings, passed to Engine(...)
as keyword arguments, and the requests' SamplingParams fields). "reference" is the oracle
(ReferenceSampler), not an engine: its Preset is empty.

No torch here: the command line builds its parser and refuses bad mode names without importing torch.
"""

from __future__ import annotations

from ..config import FAST, Preset

REFERENCE = "reference"

BENCH_MODES: dict[str, Preset] = {
    REFERENCE: Preset(engine={}, request={}),
    "exact": Preset(engine=dict(cache="none"), request={}),
    "prefix": Preset(engine=dict(cache="prefix"), request={}),
    "dual": Preset(engine=dict(cache="dual"), request={}),
    "threshold": Preset(engine=dict(cache="none"), request=dict(threshold=0.9)),
    "prefix+threshold": Preset(engine=dict(cache="prefix"), request=dict(threshold=0.9)),
    "fast": FAST,
}
DEFAULT_BENCH_MODES = (REFERENCE, "exact", "prefix", "dual", "fast")


def check_modes(modes) -> tuple[str, ...]:
    """`modes` (names, or one comma-separated string of them) as a tuple, each once, the oracle first
    (every other mode's agreement is measured against its tokens); ValueError naming the unknown ones
    and the known, or when none is given."""
    if isinstance(modes, str):
        modes = modes.split(",")
    names = tuple(dict.fromkeys(m.strip() for m in modes if m.strip()))
    if REFERENCE in names:
        names = (REFERENCE, *(m for m in names if m != REFERENCE))
    unknown = [m for m in names if m not in BENCH_MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(BENCH_MODES)}")
    if not names:
        raise ValueError(f"no mode given; choose from {', '.join(BENCH_MODES)}")
    return names
