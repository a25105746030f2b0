"""Regenerate the `params` part of schemas/request.v1.json from the installed anthropic SDK.

    .venv/bin/python scripts/gen_request_schema.py           # rewrite the file
    .venv/bin/python scripts/gen_request_schema.py --check   # exit 1 if the file is stale

The envelope of the request (request_id, partner, metadata, schema_version) is kept as it is
in the file; `properties.params` and `definitions` are replaced by what
`service.contracts.params.params_schema()` and `service.contracts.sdk_schema.definitions()`
derive from the SDK's `MessageCreateParams`. Run it after upgrading the SDK, and commit the
result with the upgrade: `make test` (tests/unit/test_request_contract.py) fails until then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.contracts import sdk_schema
from service.contracts.params import params_schema

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "request.v1.json"
_COMPACT_PARENTS = {("definitions",), ("properties", "params", "properties")}


def generated(current: dict[str, Any]) -> dict[str, Any]:
    """`current` (the file's document) with params and definitions derived from the SDK."""
    doc = dict(current)
    doc["properties"] = {**current["properties"], "params": params_schema()}
    doc["definitions"] = sdk_schema.definitions()
    return doc


def render(value: Any, path: tuple[str, ...] = (), indent: int = 0) -> str:
    """JSON with two-space indents, except one line per definition and per params field, so a
    change in the SDK shows as a change of the lines it touches."""
    if not isinstance(value, dict) or not value:
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    pad = "  " * (indent + 1)
    items = []
    for key, item in value.items():
        if path in _COMPACT_PARENTS:
            text = json.dumps(item, ensure_ascii=False, separators=(", ", ": "))
        else:
            text = render(item, (*path, key), indent + 1)
        items.append(f"{pad}{json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs; write nothing")
    parser.add_argument("--path", type=Path, default=SCHEMA_PATH)
    args = parser.parse_args(argv)
    text = args.path.read_text()
    fresh = render(generated(json.loads(text))) + "\n"
    if fresh == text:
        print(f"{args.path}: up to date with anthropic {_sdk_version()}")
        return 0
    if args.check:
        print(
            f"{args.path} differs from what anthropic {_sdk_version()} gives: "
            "run .venv/bin/python scripts/gen_request_schema.py and commit the result",
            file=sys.stderr,
        )
        return 1
    args.path.write_text(fresh)
    print(f"{args.path}: regenerated from anthropic {_sdk_version()}")
    return 0


def _sdk_version() -> str:
    import anthropic

    return str(anthropic.__version__)


if __name__ == "__main__":
    sys.exit(main())
