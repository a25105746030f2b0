"""`python -m bench.chaos [options]`: one chaos run, one JSON line on stdout (see bench/chaos/__init__.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import bench.chaos
from bench.chaos.harness import run_chaos
from bench.chaos.options import ChaosOptions, add_arguments, from_args


async def _run(options: ChaosOptions) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)  # SIGTERM: clean up as for Ctrl-C
    try:
        return await run_chaos(options)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=bench.chaos.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    options = from_args(parser.parse_args(argv))
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the broker restart is expected noise
    try:
        result = asyncio.run(_run(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(json.dumps({"bench": "chaos", "mode": options.mode, "error": "interrupted"}), flush=True)
        return 130
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        error = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"bench": "chaos", "mode": options.mode, "error": error}), flush=True)
        return 2
    print(json.dumps(result), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
