from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MetricsKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRICS_FS: _ClassVar[MetricsKind]
    METRICS_FILES: _ClassVar[MetricsKind]
    METRICS_FILES_LATEST: _ClassVar[MetricsKind]
    METRICS_PATTERN: _ClassVar[MetricsKind]
    METRICS_BACKEND: _ClassVar[MetricsKind]
    METRICS_BLOBCACHE: _ClassVar[MetricsKind]
METRICS_FS: MetricsKind
METRICS_FILES: MetricsKind
METRICS_FILES_LATEST: MetricsKind
METRICS_PATTERN: MetricsKind
METRICS_BACKEND: MetricsKind
METRICS_BLOBCACHE: MetricsKind

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DaemonInfoRequest(_message.Message):
    __slots__ = ("v2",)
    V2_FIELD_NUMBER: _ClassVar[int]
    v2: bool
    def __init__(self, v2: _Optional[bool] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("package_ver", "git_commit", "build_time", "profile", "rustc")
    PACKAGE_VER_FIELD_NUMBER: _ClassVar[int]
    GIT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    BUILD_TIME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    RUSTC_FIELD_NUMBER: _ClassVar[int]
    package_ver: str
    git_commit: str
    build_time: str
    profile: str
    rustc: str
    def __init__(self, package_ver: _Optional[str] = ..., git_commit: _Optional[str] = ..., build_time: _Optional[str] = ..., profile: _Optional[str] = ..., rustc: _Optional[str] = ...) -> None: ...

class DaemonInfo(_message.Message):
    __slots__ = ("version", "id", "supervisor", "state", "backend_collection_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SUPERVISOR_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_COLLECTION_JSON_FIELD_NUMBER: _ClassVar[int]
    version: Version
    id: str
    supervisor: str
    state: str
    backend_collection_json: str
    def __init__(self, version: _Optional[_Union[Version, _Mapping]] = ..., id: _Optional[str] = ..., supervisor: _Optional[str] = ..., state: _Optional[str] = ..., backend_collection_json: _Optional[str] = ...) -> None: ...

class SetLogLevelRequest(_message.Message):
    __slots__ = ("log_level",)
    LOG_LEVEL_FIELD_NUMBER: _ClassVar[int]
    log_level: str
    def __init__(self, log_level: _Optional[str] = ...) -> None: ...

class Events(_message.Message):
    __slots__ = ("max_errors", "total_errors", "max_size", "total_size", "errors")
    MAX_ERRORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ERRORS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    max_errors: int
    total_errors: int
    max_size: int
    total_size: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_errors: _Optional[int] = ..., total_errors: _Optional[int] = ..., max_size: _Optional[int] = ..., total_size: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class MountpointRequest(_message.Message):
    __slots__ = ("mountpoint",)
    MOUNTPOINT_FIELD_NUMBER: _ClassVar[int]
    mountpoint: str
    def __init__(self, mountpoint: _Optional[str] = ...) -> None: ...

class MountRequest(_message.Message):
    __slots__ = ("mountpoint", "fs_type", "source", "config", "prefetch_files")
    MOUNTPOINT_FIELD_NUMBER: _ClassVar[int]
    FS_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FILES_FIELD_NUMBER: _ClassVar[int]
    mountpoint: str
    fs_type: str
    source: str
    config: str
    prefetch_files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, mountpoint: _Optional[str] = ..., fs_type: _Optional[str] = ..., source: _Optional[str] = ..., config: _Optional[str] = ..., prefetch_files: _Optional[_Iterable[str]] = ...) -> None: ...

class MountInfo(_message.Message):
    __slots__ = ("mountpoint", "backend_type", "fs_type", "source", "index", "mounted_time")
    MOUNTPOINT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_TYPE_FIELD_NUMBER: _ClassVar[int]
    FS_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MOUNTED_TIME_FIELD_NUMBER: _ClassVar[int]
    mountpoint: str
    backend_type: str
    fs_type: str
    source: str
    index: int
    mounted_time: float
    def __init__(self, mountpoint: _Optional[str] = ..., backend_type: _Optional[str] = ..., fs_type: _Optional[str] = ..., source: _Optional[str] = ..., index: _Optional[int] = ..., mounted_time: _Optional[float] = ...) -> None: ...

class MountList(_message.Message):
    __slots__ = ("mounts",)
    MOUNTS_FIELD_NUMBER: _ClassVar[int]
    mounts: _containers.RepeatedCompositeFieldContainer[MountInfo]
    def __init__(self, mounts: _Optional[_Iterable[_Union[MountInfo, _Mapping]]] = ...) -> None: ...

class MetricsRequest(_message.Message):
    __slots__ = ("kind", "id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    kind: MetricsKind
    id: str
    def __init__(self, kind: _Optional[_Union[MetricsKind, str]] = ..., id: _Optional[str] = ...) -> None: ...

class JsonDocument(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class InflightOp(_message.Message):
    __slots__ = ("inode", "opcode", "unique", "timestamp_secs")
    INODE_FIELD_NUMBER: _ClassVar[int]
    OPCODE_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_SECS_FIELD_NUMBER: _ClassVar[int]
    inode: int
    opcode: int
    unique: int
    timestamp_secs: int
    def __init__(self, inode: _Optional[int] = ..., opcode: _Optional[int] = ..., unique: _Optional[int] = ..., timestamp_secs: _Optional[int] = ...) -> None: ...

class InflightList(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[InflightOp]
    def __init__(self, ops: _Optional[_Iterable[_Union[InflightOp, _Mapping]]] = ...) -> None: ...

class IdRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ConfigValues(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, str]
    def __init__(self, values: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PutConfigRequest(_message.Message):
    __slots__ = ("id", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    id: str
    values: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., values: _Optional[_Mapping[str, str]] = ...) -> None: ...
