"""A partner's policy on the request fields that change cost or placement (`partners[].policy`).

Each setting lists the values a partner may send; absent (None) means any value the API takes,
an empty list means none. A request without the field (or with null) always passes.

    policy:
      service_tier: [standard_only]     # auto may use (and bill) Priority Tier capacity
      speed: [standard]                 # fast mode costs several times more
      inference_geo: [us]
      workspace_id: []                  # never pick another workspace of the key
      server_tools: [web_search]        # web_search, web_fetch, code_execution, tool_search_tool

A value outside the list dead-letters the request `param_not_allowed`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from service.contracts.params import SERVER_TOOLS


class ParamsPolicy(BaseModel):
    """Allowed values of `service_tier`, `speed`, `inference_geo`, `workspace_id` and server tools."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    service_tier: list[Literal["auto", "standard_only"]] | None = None
    speed: list[Literal["standard", "fast"]] | None = None
    inference_geo: list[str] | None = None
    workspace_id: list[str] | None = None
    server_tools: list[str] | None = None
    """Server tool families (`web_search`, `web_fetch`, `code_execution`, `tool_search_tool`):
    tools Anthropic runs and bills. Tools the caller runs (custom, bash, text editor, memory,
    computer and browser toolsets) are always allowed."""

    @field_validator("server_tools")
    @classmethod
    def _known_families(cls, value: list[str] | None) -> list[str] | None:
        unknown = sorted(set(value or ()) - SERVER_TOOLS)
        if unknown:
            raise ValueError(f"unknown server tool {unknown[0]!r}; known: {', '.join(sorted(SERVER_TOOLS))}")
        return value

    def refusal(self, params: dict[str, object], server_tools: list[str]) -> tuple[str, object] | None:
        """The first (setting, value) of `params` this policy does not allow, or None."""
        for name in ("service_tier", "speed", "inference_geo", "workspace_id"):
            allowed: list[str] | None = getattr(self, name)
            value = params.get(name)
            if allowed is not None and value is not None and value not in allowed:
                return name, value
        if self.server_tools is not None:
            for family in server_tools:
                if family not in self.server_tools:
                    return "server_tools", family
        return None
