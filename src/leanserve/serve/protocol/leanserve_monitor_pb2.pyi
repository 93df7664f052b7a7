from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackItem(_message.Message):
    __slots__ = ("id", "class_label", "value", "class_name")
    ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    class_label: int
    value: float
    class_name: str
    def __init__(self, id: _Optional[str] = ..., class_label: _Optional[int] = ..., value: _Optional[float] = ..., class_name: _Optional[str] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("model_name", "items")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    items: _containers.RepeatedCompositeFieldContainer[FeedbackItem]
    def __init__(self, model_name: _Optional[str] = ..., items: _Optional[_Iterable[_Union[FeedbackItem, _Mapping]]] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("accepted", "unknown", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    unknown: _containers.RepeatedScalarFieldContainer[str]
    duplicate: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted: _Optional[int] = ..., unknown: _Optional[_Iterable[str]] = ..., duplicate: _Optional[_Iterable[str]] = ...) -> None: ...
