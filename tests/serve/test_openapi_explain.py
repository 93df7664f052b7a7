"""The OpenAPI document says what text explanations and named feedback labels look like."""

from leanserve.explain.text import TOKENS_SUFFIX
from leanserve.serve.protocol.openapi import openapi_document


def test_explain_routes_describe_the_tokens_beside_text_attributions():
    paths = openapi_document()["paths"]
    for path in ("/v2/models/{model}/explain", "/v2/models/{model}/versions/{version}/explain"):
        description = paths[path]["post"]["description"]
        assert f"<input>{TOKENS_SUFFIX}" in description and "<input>__attribution" in description
        assert "BYTES [texts, tokens]" in description and "'' at padding" in description


def test_feedback_labels_may_be_numbers_or_class_names():
    label = openapi_document()["components"]["schemas"]["Feedback"]["properties"]["feedback"]["items"]["properties"]["label"]
    assert label["oneOf"] == [{"type": "number"}, {"type": "string"}]
