"""Span attribute names checked against the installed `opentelemetry-semantic-conventions`.

Every attribute of a span the gateway makes must be either its own (`gateway.*`) or a name the
package defines and does not mark deprecated, used on a span of the kind the conventions
give it: `gen_ai.*` only on CLIENT spans (the inference call), `messaging.*` only on
CONSUMER and PRODUCER spans.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.semconv import _incubating, attributes
from opentelemetry.trace import SpanKind

from service.telemetry.tracing import SCOPE


@cache
def known() -> tuple[frozenset[str], frozenset[str]]:
    """(current attribute names, deprecated attribute names) of the installed package, read
    from its attribute modules and the `Deprecated:` note of each constant's docstring."""
    current: set[str] = set()
    deprecated: set[str] = set()
    for package in (attributes, _incubating.attributes):
        for mod in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{mod.name}")
            text = Path(module.__file__ or "").read_text(encoding="utf-8")
            for name, value in vars(module).items():
                if name.isupper() and isinstance(value, str) and "." in value:
                    block = (text or "").split(f"{name}: Final = ", 1)[-1].split('"""', 2)
                    doc = block[1] if len(block) > 1 else ""
                    # GenAI attributes are "deprecated" here only because they moved to their own
                    # conventions repository; they are still the names to use
                    moved = "Moved to the [OpenTelemetry GenAI semantic conventions" in doc
                    gone = doc.strip().startswith("Deprecated") and not moved
                    (deprecated if gone else current).add(value)
    return frozenset(current), frozenset(deprecated - current)


def problems(spans: Iterable[ReadableSpan]) -> list[str]:
    current, deprecated = known()
    out = []
    for span in spans:
        scope = span.instrumentation_scope
        if scope is None or scope.name != SCOPE:
            continue  # the anthropic SDK's spans are the SDK's (it follows the newer GenAI repository)
        for key in span.attributes or {}:
            if key.startswith("gateway."):
                continue
            if key in deprecated:
                out.append(f"{span.name}: {key} is deprecated")
            elif key not in current:
                out.append(f"{span.name}: {key} is not a semantic-conventions attribute")
            elif key.startswith("gen_ai.") and span.kind is not SpanKind.CLIENT:
                out.append(f"{span.name}: {key} on a {span.kind.name} span (GenAI belongs on CLIENT)")
            elif key.startswith("messaging.") and span.kind not in (SpanKind.CONSUMER, SpanKind.PRODUCER):
                out.append(f"{span.name}: {key} on a {span.kind.name} span")
    return out


def assert_semconv(spans: Iterable[ReadableSpan]) -> None:
    found = problems(spans)
    assert not found, "\n".join(found)
