"""Message contracts: the JSON Schemas in `schemas/` and the outcome builders."""
