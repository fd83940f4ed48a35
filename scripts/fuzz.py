"""A longer fuzzing campaign over graphopt's loader and every registered pass.

    python scripts/fuzz.py --minutes 10 [--seed 1] [--out work/fuzz]

Each example is a small valid model (tests/reliability/models.py) mutated at random (bytes
or structure); the contract is in tests/reliability/fuzz.py. Inputs that break it are saved
as ``OUT/failure-*.onnx``; the summary counts outcomes and lists passes that failed with a
non-graphopt exception (reported as PassFailed, exit 3 on the command line). Exit 1 when any
example broke the contract.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reliability.fuzz import run_random  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("work/fuzz"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_random(args.minutes, args.seed, args.out, log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(result, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
