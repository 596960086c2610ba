"""`make demo`: the relax → train → project cycle on offline data, with the comparison tables.

Runs the toy SO(2) demo, then the short N-body comparison on e3nn if that example is present.
"""

from __future__ import annotations

import importlib.util

from examples.toy import run as toy


def main() -> None:
    print("== 1. toy SO(2) model (pure torch) ==")
    toy.main(["--steps", "300", "--seeds", "2"])
    if importlib.util.find_spec("examples.nbody.run") is not None:
        from examples.nbody import run as nbody

        print("\n== 2. charged 5-body N-body, SEGNN-style e3nn model (short run) ==")
        nbody.main(["--quick"])


if __name__ == "__main__":
    main()
