"""`python -m bench [--only NAME ...] [options]`: run the benchmarks, one JSON object per line on stdout.

Human progress goes to stderr. The exit status is 0 when every benchmark ran (whether or not it
met its targets; read `targets_met`), 1 when one failed (its line then carries `error`) or when
a line says `"pass": false` (a benchmark that is a check, like `soak`).

Benchmarks in `ON_REQUEST` (`soak`: ten minutes) run only when named with `--only`.

Adding a benchmark: a module `bench/<name>.py`, its name appended to `BENCHES`, exposing

    def run(args: argparse.Namespace) -> dict      # or `async def`, or without `args`
    def add_arguments(parser) -> None              # optional: its own `--<name>-...` options

`run` returns a JSON-ready dict; `"bench": "<name>"` is added when missing. Brokers and
simulators come from `bench.common` (the broker at KAFKA_BOOTSTRAP_SERVERS when set).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import sys
import time
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from bench.common import log

BENCHES = ["pipeline", "eos_scale", "limits", "estimation", "cost", "soak"]
ON_REQUEST = {"soak"}


def _call(module: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    fn = module.run
    result = fn(args) if inspect.signature(fn).parameters else fn()
    if inspect.isawaitable(result):

        async def wait() -> Any:
            return await result

        result = asyncio.run(wait())
    if not isinstance(result, dict):
        raise TypeError(f"bench.{module.__name__}.run() returned {type(result).__name__}, not a dict")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", action="append", choices=BENCHES, metavar="NAME", help=f"run only NAME (one of {BENCHES})"
    )
    modules: dict[str, ModuleType] = {}
    broken: dict[str, str] = {}
    for name in BENCHES:
        try:
            module = importlib.import_module(f"bench.{name}")
        except Exception as exc:  # reported as that benchmark's result
            broken[name] = f"cannot import bench.{name}: {type(exc).__name__}: {exc}"
            continue
        modules[name] = module
        add_arguments = getattr(module, "add_arguments", None)
        if add_arguments is not None:
            add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # e.g. a new topic's leader not elected yet

    failed = 0
    for name in args.only or [b for b in BENCHES if b not in ON_REQUEST]:
        began = time.monotonic()
        log(f"{name}: running")
        try:
            if name in broken:
                raise RuntimeError(broken[name])
            result = _call(modules[name], args)
        except KeyboardInterrupt:
            log(f"{name}: interrupted")
            return 130
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            result = {"bench": name, "error": f"{type(exc).__name__}: {exc}"}
            failed += 1
        result = {"bench": name, **result}
        if result.get("pass") is False:
            failed += 1
        log(f"{name}: done in {time.monotonic() - began:.1f}s")
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
