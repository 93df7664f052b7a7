"""The OpenAPI 3 document of the REST API, served at ``/openapi.json``.

Written out rather than generated because the routes take raw bodies (JSON or JSON plus binary
tensor data) that a schema generator cannot see; a test checks it lists exactly the app's routes.
"""

from __future__ import annotations

from typing import Any

from leanserve import __version__
from leanserve.dtypes import DATATYPES


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "Bad input: malformed JSON, wrong datatype/shape, unknown output"),
    "404": _json(_ref("Error"), "Unknown model or version"),
    "503": _json(_ref("Error"), "Not ready or overloaded (see Retry-After)"),
}
_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
_ADMIN_ERRORS = {
    "401": _json(_ref("Error"), "Missing or wrong bearer token"),
    "403": _json(_ref("Error"), "Admin API disabled, or caller not on loopback"),
    "404": _json(_ref("Error"), "Unknown model"),
}


def _get(summary: str, schema: str, params: list | None = None, errors: dict | None = None) -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": params or [], "responses": {"200": _json(_ref(schema), "OK"), **(errors or {})}}}


def _infer(params: list) -> dict[str, Any]:
    return {"post": {
        "summary": "Run inference (JSON, or JSON followed by binary tensor data)",
        "parameters": params + [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                                 "schema": {"type": "integer"}, "description": "Length of the JSON header when binary data follows"},
                                {"name": "x-routing-key", "in": "header", "required": False, "schema": {"type": "string"},
                                 "description": "Sticky routing: the same key always reaches the same version"}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("InferenceRequest")},
                                                      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": {"description": "Outputs", "content": {
            "application/json": {"schema": _ref("InferenceResponse")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            **_ERRORS, "413": _json(_ref("Error"), "Body too large"), "504": _json(_ref("Error"), "Timed out")},
    }}


def _explain(infer: dict[str, Any]) -> dict[str, Any]:
    """The infer operation, answered with attributions too (an extra ``<input>__attribution`` output, and for
    text ``<input>__tokens``: ``explain.text.TOKENS_SUFFIX``)."""
    infer["post"]["summary"] = ("Run inference and explain it: the outputs plus <input>__attribution, shaped like the "
                                "input (per feature, pixel or token), its method in the tensor's parameters (explain_method "
                                "permutation|partition|kernel|integrated_gradients)")
    infer["post"]["description"] = (
        "A text input (V2 BYTES, a text pipeline version) is explained per token of the version's own tokenizer: "
        "<input>__attribution is FP32 [texts, tokens], one score per token position, and beside it <input>__tokens "
        "is BYTES [texts, tokens], the token at each position as a string ('' at padding, special tokens such as "
        "[CLS] included), so each attribution can be read next to its token.")
    return infer


def _admin(summary: str, body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "security": [{"bearer": []}], "parameters": [_MODEL],
                          "responses": {"200": _json({"type": "object"}, "Model status"), **_ADMIN_ERRORS}}
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref("Traffic")}}}
    return {"post": op}


def _tokenize(params: list) -> dict[str, Any]:
    return {"post": {"summary": "Tokens of a text or a list of texts, with ids and character spans (text pipelines)",
                     "parameters": params,
                     "requestBody": {"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "properties": {"text": {"description": "a string or a list of strings"}}}}}},
                     "responses": {"200": _json({"type": "object"}, "tokens per text and the model's max_length"),
                                   **_ERRORS}}}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of every route the server answers."""
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string", "enum": list(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer"}}, "parameters": {"type": "object"},
        "data": {"description": "Flat or nested values, row-major"}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "leanserve", "version": __version__,
                 "description": "Open Inference Protocol (KServe V2) REST API with leanserve's admin extension"},
        "paths": {
            "/v2/health/live": _get("Server liveness", "Live"),
            "/v2/health/ready": _get("Server readiness (503 until models are warm)", "Ready", errors={"503": _json(_ref("Ready"), "Not ready")}),
            "/v2": _get("Server metadata", "ServerMetadata"),
            "/v2/models/{model}": _get("Model metadata", "ModelMetadata", [_MODEL], _ERRORS),
            "/v2/models/{model}/versions/{version}": _get("Model version metadata", "ModelMetadata", [_MODEL, _VERSION], _ERRORS),
            "/v2/models/{model}/ready": _get("Model readiness", "ModelReady", [_MODEL], _ERRORS),
            "/v2/models/{model}/versions/{version}/ready": _get("Model version readiness", "ModelReady", [_MODEL, _VERSION], _ERRORS),
            "/v2/models/{model}/infer": _infer([_MODEL]),
            "/v2/models/{model}/versions/{version}/infer": _infer([_MODEL, _VERSION]),
            "/v2/models/{model}/explain": _explain(_infer([_MODEL])),  # leanserve.explain
            "/v2/models/{model}/versions/{version}/explain": _explain(_infer([_MODEL, _VERSION])),
            "/v2/models/{model}/feedback": {"post": {
                "summary": "Delayed ground truth: labels for earlier requests, joined by request id",
                "parameters": [_MODEL],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Feedback")}}},
                "responses": {"200": _json({"type": "object"}, "accepted count, unknown and duplicate ids"), **_ERRORS}}},
            "/dashboard": {"get": {"summary": "Monitoring dashboard (HTML)", "responses": {"200": {"description": "page", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/v2/monitor": {"get": {"summary": "Monitoring picture of every model", "responses": {"200": _json({"type": "object"}, "per model: versions, figures, history, traffic, rollout, alerts")}}},
            "/v2/monitor/models/{model}": {"get": {"summary": "Monitoring picture of one model", "parameters": [_MODEL],
                                                   "responses": {"200": _json({"type": "object"}, "figures"), "404": _ERRORS["404"]}}},
            "/v1/embeddings": {"post": {  # leanserve.serve.protocol.openai: text pipeline versions
                "summary": "OpenAI-compatible embeddings of a text or a list of texts",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("EmbeddingsRequest")}}},
                "responses": {"200": _json({"type": "object"}, "OpenAI's list of embeddings with usage"), **_ERRORS}}},
            "/v2/models/{model}/tokenize": _tokenize([_MODEL]),
            "/v2/models/{model}/versions/{version}/tokenize": _tokenize([_MODEL, _VERSION]),
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json({"type": "object"}, "OpenAPI document")}}},
            "/v2/admin/models": {"get": {"summary": "Loaded, loading and failed versions and traffic of every model",
                                         "security": [{"bearer": []}], "responses": {"200": _json({"type": "object"}, "Status"), **_ADMIN_ERRORS}}},
            "/v2/admin/models/{model}/load": _admin("Serve a model (per its version policy)"),
            "/v2/admin/models/{model}/unload": _admin("Stop serving a model (drains first)"),
            "/v2/admin/models/{model}/reload": _admin("Reload a model's versions with fresh sessions and settings"),
            "/v2/admin/models/{model}/traffic": _admin("Set traffic weights and shadow version (persisted)", body=True),
            "/v2/admin/models/{model}/rollback": _admin("Move all traffic to the previous version"),
            "/v2/admin/models/{model}/canary": _admin("Start a guarded canary rollout of a version", body=True),
            "/v2/admin/models/{model}/promote": _admin("Give all traffic to a registered version", body=True),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
                "Live": {"type": "object", "properties": {"live": {"type": "boolean"}}},
                "Ready": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
                "ModelReady": {"type": "object", "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
                "ServerMetadata": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                                                    "extensions": {"type": "array", "items": {"type": "string"}}}},
                "TensorMetadata": {"type": "object", "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                                                    "shape": {"type": "array", "items": {"type": "integer"}}}},
                "ModelMetadata": {"type": "object", "properties": {
                    "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                    "platform": {"type": "string"}, "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                    "outputs": {"type": "array", "items": _ref("TensorMetadata")}}},
                "RequestTensor": tensor,
                "InferenceRequest": {"type": "object", "required": ["inputs"], "properties": {
                    "id": {"type": "string"}, "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": _ref("RequestTensor")},
                    "outputs": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "parameters": {"type": "object"}}}}}},
                "InferenceResponse": {"type": "object", "properties": {
                    "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
                    "parameters": {"type": "object"}, "outputs": {"type": "array", "items": _ref("RequestTensor")}}},
                "Feedback": {"type": "object", "required": ["feedback"], "properties": {"feedback": {
                    "type": "array", "items": {"type": "object", "required": ["id", "label"], "properties": {
                        "id": {"type": "string"},
                        "label": {"oneOf": [{"type": "number"}, {"type": "string"}],
                                  "description": "the class index or true value; a classifier's class name is mapped "
                                                 "by the answering version's labels"}}}}}},
                "EmbeddingsRequest": {"type": "object", "required": ["model", "input"], "properties": {
                    "model": {"type": "string"}, "input": {"description": "a string or a list of strings"},
                    "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                    "dimensions": {"type": "integer"}}},
                "Traffic": {"type": "object", "properties": {
                    "weights": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "shadow": {"type": "integer", "nullable": True}}},
            },
        },
    }
