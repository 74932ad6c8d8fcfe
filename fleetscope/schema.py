"""Wire schema: every record that crosses a process boundary, as strict msgspec structs (v1).

The workload client writes `StepEvent` / `RequestEvent` / `PauseEvent` datagrams (without the fields the agent
adds: node, gpu_uuid); the agent ships them to the collector inside a `Batch` together with
`HostFrame`s. Decoding is strict: a wrong type, a missing field, an unknown field or a value out of
range is an error that names the field, and an unknown version is refused before anything else.
Only the agent and the collector import this module (it needs msgspec); the client does not.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

import msgspec
import msgspec.inspect
from msgspec import Meta, Struct

SCHEMA_VERSION = 1

# Names are what operators read in labels and URLs: printable, bounded. (No control characters either:
# checked after decoding, see _control_characters, because a pattern here costs half of all decoding.)
Name = Annotated[str, Meta(min_length=1, max_length=256)]
Seconds = Annotated[float, Meta(gt=0, le=7 * 24 * 3600)]
NonNegSeconds = Annotated[float, Meta(ge=0, le=7 * 24 * 3600)]
Count = Annotated[int, Meta(ge=0, le=2**53)]
# Bounded so that the collector can keep them in 32 bits: no job has 16 M ranks, no kernel 2^31 pids.
Rank = Annotated[int, Meta(ge=0, lt=2**24)]
Stage = Annotated[int, Meta(ge=0, lt=2**16)]
Pid = Annotated[int, Meta(ge=0, lt=2**31)]
# Up to 2286-11-20: anything later (or infinite) is a bug in the sender, not a time.
UnixTime = Annotated[float, Meta(ge=0, le=1e10)]
Finite = Annotated[float, Meta(ge=-1e300, le=1e300)]  # JSON's 1e999 decodes to infinity: refuse it
NonNeg = Annotated[float, Meta(ge=0, le=1e300)]
Ratio = Annotated[float, Meta(ge=0, le=1)]


SlurmId = Annotated[str, Meta(min_length=1, max_length=64)]


class SlurmIds(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The Slurm job a workload process runs in: sent by the client from its SLURM_* environment, or set by the
    agent from the process's cgroup and environment (agent/slurm.py) when the kernel names the sender."""

    job: SlurmId  # SLURM_JOB_ID
    step: SlurmId | None = None  # SLURM_STEP_ID: a number, or batch, extern, interactive
    user: Name | None = None  # SLURM_JOB_USER
    partition: Name | None = None  # SLURM_JOB_PARTITION
    array_job: SlurmId | None = None  # SLURM_ARRAY_JOB_ID
    array_task: SlurmId | None = None  # SLURM_ARRAY_TASK_ID
    name: Name | None = None  # SLURM_JOB_NAME
    restart_count: Count | None = None  # SLURM_RESTART_COUNT: a requeued job keeps its id and counts up


class PodIds(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The Kubernetes pod a workload process runs in. A client describes itself (POD_NAME and POD_NAMESPACE from
    the downward API, else its hostname and its service account's namespace); the agent replaces that with what it
    reads itself for a Unix-socket sender (the process's cgroup, the kubelet's log folders: agent/kubernetes.py)
    and says which with `verified`, which only the agent sets."""

    namespace: Name
    pod: Name
    container: Name | None = None
    verified: bool = False  # the agent read it for the kernel-named sender; False: the client's own claim


# Events are never tracked by Python's cycle collector (gc=False): they hold only strings, numbers, dicts of
# numbers and frozen structs, so they cannot form a cycle, and a batch decodes a thousand of them: tracked,
# they trigger a collection or two per batch (decoding 1,000 step events in a loop: 0.91 ms median, 1.21 mean ->
# 0.79 and 0.81).
class StepEvent(Struct, tag="step", tag_field="kind", forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """One training step of one rank."""

    v: Literal[1]
    job: Name
    rank: Rank
    world_size: Annotated[int, Meta(ge=1, le=2**24)]
    step: Count
    ts: UnixTime  # wall-clock start of the step
    duration_s: Seconds
    local_rank: Rank = 0
    stage: Stage | None = None  # pipeline-parallel stage: ranks are compared with their stage's peers
    pid: Pid = 0
    tokens: Count | None = None
    samples: Count | None = None
    flops_per_token: NonNeg | None = None  # model FLOPs per token (fwd + bwd), declared by the job: for MFU
    phases: dict[Name, NonNegSeconds] = {}
    metrics: dict[Name, Finite] = {}
    failed: bool = False
    # On the first step a run reports (and the first after a restore): where an incarnation of the job begins.
    process_start_ts: UnixTime | None = None  # when the OS started this rank's process: start-up time
    restored_step: Count | None = None  # the checkpoint's step this run resumed from (run.restored)
    slurm: SlurmIds | None = None  # under Slurm (optional: added in place, older senders leave it out)
    pod: PodIds | None = None  # on Kubernetes (optional, as slurm)
    # Added by the agent.
    node: Name | None = None
    gpu_uuid: Name | None = None


class RequestEvent(Struct, tag="request", tag_field="kind", forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """One inference request served by one replica."""

    v: Literal[1]
    service: Name
    model: Name
    ts: UnixTime
    e2e_s: Seconds
    status: Literal["ok", "error", "cancelled"] = "ok"
    pid: Pid = 0
    queue_s: NonNegSeconds | None = None
    ttft_s: NonNegSeconds | None = None
    tpot_s: NonNegSeconds | None = None
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    slurm: SlurmIds | None = None
    pod: PodIds | None = None
    node: Name | None = None
    gpu_uuid: Name | None = None


class PauseEvent(Struct, tag="pause", tag_field="kind", forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """A rank declares a pause (a checkpoint, an evaluation) so that no progress is not taken for a hang."""

    v: Literal[1]
    job: Name
    rank: Rank
    world_size: Annotated[int, Meta(ge=1, le=2**24)]
    reason: Name
    phase: Literal["begin", "end"]
    ts: UnixTime
    duration_s: NonNegSeconds | None = None  # on "end"
    local_rank: Rank = 0
    pid: Pid = 0
    slurm: SlurmIds | None = None
    pod: PodIds | None = None
    node: Name | None = None
    gpu_uuid: Name | None = None


Event = Union[StepEvent, RequestEvent, PauseEvent]


class GpuFrame(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """The state of one GPU at one sample; an unsupported field is absent, never 0."""

    index: Annotated[int, Meta(ge=0, lt=2**15)]
    uuid: Name
    name: Name | None = None
    up: bool = True
    utilization_ratio: Ratio | None = None
    memory_used_bytes: Count | None = None
    memory_total_bytes: Count | None = None
    temperature_celsius: Finite | None = None
    power_watts: NonNeg | None = None
    power_limit_watts: NonNeg | None = None
    sm_clock_hertz: NonNeg | None = None
    sm_clock_max_hertz: NonNeg | None = None
    clock_event_mask: Count | None = None  # NVML clock-event reason bits
    health: Literal["healthy", "degraded", "unhealthy"] | None = None
    health_reasons: list[Name] = []
    xid_total: Count | None = None  # XIDs since the agent started
    xid_counts: dict[Annotated[str, Meta(pattern=r"^[0-9]{1,5}$")], Count] = {}  # the same, by XID code
    # Aggregate (lifetime) ECC error counts, and row remapping (Ampere and newer), for the reliability record.
    ecc_corrected_total: Count | None = None
    ecc_uncorrected_total: Count | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None


class HostFrame(Struct, tag="host", tag_field="kind", forbid_unknown_fields=True, omit_defaults=True):
    """A node's state at one sample, as the agent's sampler saw it."""

    v: Literal[1]
    node: Name
    ts: UnixTime
    cpu_utilization_ratio: Ratio | None = None
    memory_used_bytes: Count | None = None
    memory_total_bytes: Count | None = None
    load1: NonNeg | None = None
    # cumulative counters, for the collector to difference over a window
    network_errors_total: NonNeg | None = None  # receive + transmit errors and drops, all interfaces
    infiniband_errors_total: NonNeg | None = None  # symbol, receive, link-downed, ... all ports
    memory_stalled_seconds_total: NonNeg | None = None  # PSI memory "full"
    network_receive_bytes_total: NonNeg | None = None  # all interfaces but loopback
    network_transmit_bytes_total: NonNeg | None = None
    disk_read_bytes_total: NonNeg | None = None  # all block devices
    disk_written_bytes_total: NonNeg | None = None
    gpus: list[GpuFrame] = []
    sources_down: list[Name] = []
    labels: dict[Name, Name] = {}  # the node's place in the fleet: cluster, rack, ...


class HistogramDelta(Struct, forbid_unknown_fields=True):
    """Observations of one latency histogram during an interval; the last bound stands for +Inf (1e300)."""

    le: list[NonNeg]
    counts: list[NonNeg]
    sum: Finite
    count: NonNeg


class ServerFrame(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What an inference server (vLLM, SGLang, TGI, Triton) did during one agent sample interval, per model."""

    v: Literal[1]
    service: Name
    model: Name
    server: Name
    kind: Literal["vllm", "sglang", "tgi", "triton"]
    ts: UnixTime
    interval_s: Annotated[float, Meta(gt=0, le=86400)]
    histograms: dict[Literal["e2e", "queue", "ttft", "tpot"], HistogramDelta] = {}
    gauges: dict[Name, Finite] = {}
    counters: dict[Name, NonNeg] = {}  # deltas over the interval
    node: Name | None = None


class Batch(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What an agent POSTs to /v1/ingest: events and frames, applied once per (node, agent_id, epoch, seq)."""

    v: Literal[1]
    agent_id: Name
    seq: Count
    node: Name
    sent_ts: UnixTime
    events: list[Event] = []
    frames: list[HostFrame] = []
    servers: list[ServerFrame] = []
    # The agent process's boot epoch, new at each start: sequence numbers count from 0 again in a new epoch,
    # and the collector keeps a watermark per (identity, epoch). Absent (older agents): one watermark per agent_id.
    epoch: Name | None = None


class _Envelope(Struct):
    """Just enough of a record to refuse an unknown version and to name the batch in an error."""

    v: int | None = None
    agent_id: object = None
    seq: object = None


class SchemaError(ValueError):
    """A record that does not match the wire schema; the message names the field."""


class UnsupportedVersion(SchemaError):
    """A record without a schema version, or with one this side does not speak."""


class MalformedError(SchemaError):
    """A body that is not JSON at all."""


class TooDeep(MalformedError):
    """A body whose arrays and objects nest deeper than any record does (MAX_DEPTH)."""


# A batch nests 6 levels (batch > frames > host frame > gpus > gpu > xid_counts); decoding something nested
# far deeper (or skipping it, as msgspec does before a union's tag) recurses until Python refuses.
MAX_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_AS_SQUARE = bytes.maketrans(b"{}", b"[]")  # for depth, an object is as deep as an array


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_batch_decoder = msgspec.json.Decoder(Batch)
_event_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()


def _check_version(data: bytes, what: str) -> str:
    """Refuse a body that is not JSON or not our version; return how to name it in errors."""
    try:
        envelope = _envelope_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise SchemaError(f"{what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MalformedError(f"{what}: body is not valid JSON ({exc})") from None
    if isinstance(envelope.seq, int) and isinstance(envelope.agent_id, str):
        what = f"{what} {envelope.seq} from agent {envelope.agent_id[:100]}"
    if envelope.v is None:
        raise UnsupportedVersion(f'{what}: missing required field "v" (the schema version; this side speaks {SCHEMA_VERSION})')
    if envelope.v != SCHEMA_VERSION:
        raise UnsupportedVersion(f"{what}: unsupported schema version {envelope.v} (this side speaks {SCHEMA_VERSION})")
    return what


def _nested_deeper_than(data: bytes, limit: int) -> bool:
    """Whether the arrays and objects of a JSON text nest more than `limit` levels (strings ignored): each
    pass removes the innermost pairs, at C speed. Unbalanced brackets stop it early (not JSON anyway)."""
    brackets = _JSON_STRING.sub(b"", data).translate(_AS_SQUARE, _NOT_BRACKETS)
    for _ in range(limit):
        shorter = brackets.replace(b"[]", b"")  # one pass: what a removal exposes waits for the next
        if not shorter or len(shorter) == len(brackets):
            return False
        brackets = shorter
    return True


def _too_deep(what: str) -> TooDeep:
    return TooDeep(f"{what}: JSON nested more than {MAX_DEPTH} levels deep (a valid record nests at most 6); not decoded")


def _decode(data: bytes, decoder: msgspec.json.Decoder, what: str):
    try:
        record = decoder.decode(data)
    except RecursionError:
        raise _too_deep(what) from None
    except msgspec.DecodeError as exc:
        # A record that decodes nests as little as the schema does: depth is looked at only on failure,
        # before anything decodes the body without a schema (the version envelope would recurse).
        if _nested_deeper_than(data, MAX_DEPTH):
            raise _too_deep(what) from None
        # Say what is wrong in the order a reader cares: not JSON, then the version, then the field.
        try:
            what = _check_version(data, what)
        except RecursionError:
            raise _too_deep(what) from None
        raise SchemaError(f"{what}: {exc}") from None
    # JSON strings hold control characters only as escapes: a body without a backslash has none.
    if b"\\" in data:
        where = _control_characters(msgspec.to_builtins(record), "$")
        if where:
            what = _check_version(data, what)
            raise SchemaError(f"{what}: control characters are not allowed in names or labels - at `{where}`")
    return record


def _control_characters(value: object, path: str) -> str | None:
    """The path of the first string (or key) holding a control character, or None."""
    if isinstance(value, str):
        return path if any(ord(c) < 0x20 for c in value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _control_characters(key, f"{path}.{key!r}") or _control_characters(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _control_characters(item, f"{path}[{i}]")
            if found:
                return found
    return None


def decode_batch(data: bytes) -> Batch:
    """Decode and validate an ingest body; raises SchemaError naming the field at fault."""
    return _decode(data, _batch_decoder, "batch")


def decode_event(data: bytes) -> Event:
    """Decode and validate one client datagram."""
    return _decode(data, _event_decoder, "event")


def decode_client_event(data: bytes) -> tuple[Event, list[str]]:
    """One client datagram, forward-compatibly: the agent on a node may be older than the clients in its jobs'
    environments, so fields it does not know (a newer client's) are dropped and named, not refused. Everything
    else is as strict as decode_event: types, ranges, the version, depth and control characters. The agent then
    ships the event in its own schema, so the collector never sees the unknown fields."""
    try:
        return decode_event(data), []
    except SchemaError as exc:
        if "unknown field" not in str(exc):
            raise
        strict_error = exc
    raw = msgspec.json.decode(data)  # not too deep and our version: the strict decode checked both first
    cls = _EVENT_TYPES.get(raw.get("kind")) if isinstance(raw, dict) else None
    if cls is None:
        raise strict_error
    dropped: list[str] = []
    _drop_unknown(raw, cls, "$", dropped)
    try:
        event = msgspec.convert(raw, Event)
    except msgspec.ValidationError as exc:
        raise SchemaError(f"event: {exc}") from None
    where = _control_characters(msgspec.to_builtins(event), "$")
    if where:
        raise SchemaError(f"event: control characters are not allowed in names or labels - at `{where}`")
    return event, dropped


_EVENT_TYPES = {cls.__struct_config__.tag: cls for cls in (StepEvent, RequestEvent, PauseEvent)}


def _drop_unknown(raw: dict, cls: type[Struct], path: str, dropped: list[str]) -> None:
    """Remove from `raw` the keys `cls` does not declare (its tag field aside), recursing into struct fields."""
    info = msgspec.inspect.type_info(cls)
    fields = {f.encode_name: f.type for f in info.fields}
    keep = set(fields) | ({info.tag_field} if info.tag_field else set())
    for key in [k for k in raw if k not in keep]:
        del raw[key]
        dropped.append(f"{path}.{key}")
    for key, kind in fields.items():
        value = raw.get(key)
        if not isinstance(value, dict):
            continue
        kinds = kind.types if isinstance(kind, msgspec.inspect.UnionType) else (kind,)
        for k in kinds:
            if isinstance(k, msgspec.inspect.StructType):
                _drop_unknown(value, k.cls, f"{path}.{key}", dropped)


def encode(record: Struct) -> bytes:
    return _encoder.encode(record)


def to_builtins(record: Struct) -> dict:
    return msgspec.to_builtins(record)
