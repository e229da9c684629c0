"""The verdict of one benchmark row: met, missed, info, or floor invalid.

A floor is the same work done without mmd, so mmd cannot beat it: a ratio that
says mmd was faster (or smaller) than its floor by more than the noise, or an
added latency below zero, means the floor measured something other than the
work mmd does (a slow client, a swap that evicted nothing). Such a row is
"floor invalid", whatever its target says: its figure proves nothing.

A peer (another tool doing the same job, such as llama.cpp's router mode) is no
floor: mmd may beat it. Its rows read ahead, level or behind by the ratio
mmd / peer (``peer_verdict``).
"""

from __future__ import annotations

import math
from typing import Literal

Verdict = Literal["met", "missed", "info", "floor invalid", "ahead", "level", "behind"]
# Which way is better for a row's ratio (mmd / floor): "higher" for rates,
# "lower" for times and sizes, "" where the floor is no bound (an estimate
# against its measurement may err either way).
Better = Literal["higher", "lower", ""]

# How far mmd may seem to beat its floor before that is more than noise: run to
# run, the same work varies by a percent or two on an idle machine.
TOLERANCE = 1.02


def verdict(
    target_met: bool | None,
    *,
    ratio: float | None = None,
    better: Better = "lower",
    added: float | None = None,
    problem: str = "",
) -> tuple[Verdict, str]:
    """(verdict, why the floor is invalid or "").

    ``target_met`` is the row's target compared (None: the row has no target);
    ``ratio`` is mmd / floor; ``added`` is what mmd adds to its floor (a
    latency difference), which cannot be negative; ``problem`` is a benchmark's
    own reason its floor did not hold (e.g. no eviction in a swap).
    """
    if problem:
        return "floor invalid", problem
    if ratio is not None and better:
        if not math.isfinite(ratio) or ratio <= 0:
            return "floor invalid", f"ratio {ratio} is no measurement"
        beaten = ratio if better == "higher" else 1 / ratio
        if beaten > TOLERANCE:
            return "floor invalid", (
                f"mmd beat its floor {beaten:.3f}x (more than {TOLERANCE}x): "
                "the floor is not the fastest way to do the same work"
            )
    if added is not None and (not math.isfinite(added) or added < 0):
        return "floor invalid", f"added {added:.3g} < 0: the floor is slower than mmd"
    if target_met is None:
        return "info", ""
    return ("met" if target_met else "missed"), ""


# How far mmd and a peer may differ and still be level: on a shared 2-core machine the
# same work varies by several percent run to run, more than a floor's 2%.
LEVEL_BAND = 1.05


def peer_verdict(ratio: float | None, better: Better, *, problem: str = "") -> tuple[Verdict, str]:
    """(ahead / level / behind, or info with why) of mmd against a peer.

    ``ratio`` is mmd / peer; ``better`` says which way is mmd's advantage ("higher" for
    rates, "lower" for times and sizes). Without a ratio (the peer could not run, or
    ``problem`` says why the comparison does not hold) the row is info.
    """
    if problem:
        return "info", problem
    if ratio is None or not math.isfinite(ratio) or ratio <= 0 or not better:
        return "info", "no ratio to compare"
    advantage = ratio if better == "higher" else 1 / ratio
    if advantage > LEVEL_BAND:
        return "ahead", ""
    if advantage < 1 / LEVEL_BAND:
        return "behind", ""
    return "level", ""
