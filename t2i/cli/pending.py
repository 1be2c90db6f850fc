"""Commands whose stage has not landed yet. They say so plainly and exit non-zero; no fake output."""

import sys

PENDING = {
    "t2i-eval": "benchmark evaluation (needs the evaluation stage, issue #6)",
}


def _pending(name: str) -> None:
    print(f"{name}: not yet available - {PENDING[name]}. Nothing was run.", file=sys.stderr)
    sys.exit(2)


def evaluate() -> None:
    _pending("t2i-eval")
