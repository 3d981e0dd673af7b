"""Validate response bodies against TGI's OpenAPI document (`tests/data/tgi-openapi.json`).

Needs `jsonschema` (the test extra); imported lazily so `tgi.testing` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OpenApiSchemas"]


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` is no JSON Schema keyword: turn it into a null branch."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _nullable_to_json_schema(value) for key, value in node.items()}
    if converted.pop("nullable", False):
        return {"anyOf": [{"type": "null"}, converted]}
    return converted


class OpenApiSchemas:
    """Validates bodies against `#/components/schemas/<name>` of TGI's OpenAPI document."""

    _URI = "urn:tgi-openapi"

    def __init__(self, document: dict[str, Any]) -> None:
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        contents = {"components": _nullable_to_json_schema(document["components"])}
        resource = Resource.from_contents(contents, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(self._URI, resource)

    def errors(self, name: str, instance: Any) -> list[str]:
        from jsonschema import Draft202012Validator

        schema = {"$ref": f"{self._URI}#/components/schemas/{name}"}
        validator = Draft202012Validator(schema, registry=self._registry)
        return [error.message for error in validator.iter_errors(instance)]

    def validate(self, name: str, instance: Any) -> None:
        errors = self.errors(name, instance)
        assert not errors, f"{name} schema violations: {errors} in {instance!r}"
