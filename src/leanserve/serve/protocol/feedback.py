"""Feedback calls as both transports receive them: one validation with one set of caps, and the token
check, so that REST's ``/feedback`` and gRPC's ``leanserve.Monitoring/Feedback`` refuse the same call
with the same message."""

from __future__ import annotations

import hmac
import math
from collections.abc import Sequence

from leanserve.errors import InvalidInput, Unauthorized
from leanserve.serve.settings import FEEDBACK_TOKEN_ENV

MAX_FEEDBACK_ITEMS = 10_000
MAX_REQUEST_ID_CHARS = 256  # longer ids are refused: each one is an index lookup in the log
MAX_LABEL_NAME_CHARS = 256  # a class name (a text classifier's "positive"); longer ones name no class


def feedback_items(items: Sequence[tuple[object, object]]) -> list[tuple[str, int | float | str]]:
    """(request id, label) pairs checked: 1 to MAX_FEEDBACK_ITEMS of them, each id a non-empty string of
    at most MAX_REQUEST_ID_CHARS, each label a finite number (class index or true value) or a class name
    (a non-empty string of at most MAX_LABEL_NAME_CHARS, mapped to its index by the monitor's feedback
    with the labels of the version that answered). A field the client left out is None here. Raises
    InvalidInput naming the first item at fault."""
    if not items:
        raise InvalidInput("feedback needs at least one item")
    if len(items) > MAX_FEEDBACK_ITEMS:
        raise InvalidInput(f"at most {MAX_FEEDBACK_ITEMS} feedback items per call, got {len(items)}")
    pairs = []
    for i, (request_id, label) in enumerate(items):
        if not isinstance(request_id, str) or not request_id:
            raise InvalidInput(f"feedback[{i}] needs an 'id' string (the request id of the prediction)")
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidInput(f"feedback[{i}] id is {len(request_id)} characters long; at most {MAX_REQUEST_ID_CHARS} expected")
        if isinstance(label, str):
            if not label or len(label) > MAX_LABEL_NAME_CHARS:
                raise InvalidInput(f"feedback[{i}] label is a class name of {len(label)} characters; expected 1 to "
                                   f"{MAX_LABEL_NAME_CHARS}")
        elif isinstance(label, bool) or not isinstance(label, (int, float)) or (isinstance(label, float) and not math.isfinite(label)):
            raise InvalidInput(f"feedback[{i}] label must be a finite number (class index or true value) or a class "
                               f"name, got {label!r}")
        pairs.append((request_id, label))
    return pairs


def check_feedback_token(authorization: str | None, token: str | None) -> None:
    """Refuse a feedback call without ``Authorization: Bearer <token>`` when the server has a feedback
    token (Unauthorized); with none set, feedback is open (see the README for why)."""
    if token and not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
        raise Unauthorized(f"missing or wrong feedback token (Authorization: Bearer <token>, as set in {FEEDBACK_TOKEN_ENV})")
