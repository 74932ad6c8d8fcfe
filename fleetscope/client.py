"""Workload client: training steps and inference requests sent as datagrams to the node's agent.

Zero dependencies, never blocks, never raises into the caller. Each event is one JSON datagram
(the `StepEvent` / `RequestEvent` records of `fleetscope/schema.py`, without the fields the agent
adds), sent to the agent's Unix socket (/run/fleetscope/events.sock), where the kernel tells the agent
who sent it, or else to UDP 127.0.0.1:9836. A datagram that cannot be sent (no agent, its queue
full) is counted in `dropped`, never retried: a workload must not slow down because its monitoring
is unwell.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from contextlib import ContextDecorator, contextmanager
from typing import Any, Iterator

from fleetscope import vocabulary
from fleetscope.vocabulary import AGENT_EVENTS_PORT

SCHEMA_VERSION = 1
DEFAULT_AGENT_HOST = "127.0.0.1"
DEFAULT_AGENT_PORT = AGENT_EVENTS_PORT
# The agent's Unix datagram socket (agent/systemd's RuntimeDirectory=fleetscope): used when it exists.
DEFAULT_AGENT_SOCKET = "/run/fleetscope/events.sock"
# One datagram must fit in a single UDP payload on loopback; the agent refuses larger ones.
MAX_DATAGRAM_BYTES = vocabulary.MAX_DATAGRAM_BYTES
# While the default fell back to UDP, how often to look again for the agent's Unix socket (an agent that
# started after the workload, or was reconfigured).
DEFAULT_RECHECK_S = 10.0

log = logging.getLogger("fleetscope.client")

def parse_agent_address(raw: str) -> tuple[str, int] | str:
    """`unix:/path` (a path) or `host:port` (a tuple); raises ValueError for anything else."""
    if raw.startswith("unix:"):
        path = raw[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(f"{raw!r} is not unix:/absolute/path")
        return path
    host, _, port = raw.rpartition(":")
    return (host or DEFAULT_AGENT_HOST, int(port))


def default_agent_address() -> tuple[str, int] | str:
    """The agent's Unix socket where it exists, else UDP on loopback."""
    if os.path.exists(DEFAULT_AGENT_SOCKET):
        return DEFAULT_AGENT_SOCKET
    return (DEFAULT_AGENT_HOST, DEFAULT_AGENT_PORT)


def _agent_address() -> tuple[str, int] | str | None:
    """Where the agent listens as FLEETSCOPE_AGENT_ADDR says (unix:/path or host:port); None: the default."""
    raw = os.environ.get("FLEETSCOPE_AGENT_ADDR", "")
    if raw:
        try:
            return parse_agent_address(raw)
        except ValueError:
            log.warning("fleetscope: FLEETSCOPE_AGENT_ADDR=%r is neither unix:/path nor host:port; using the default",
                        raw)
    return None


class Emitter:
    """Sends events as datagrams; safe across threads and after fork (the socket is per process).

    `address`: UDP (host, port), a Unix socket's path, or "unix:/path". Without one, FLEETSCOPE_AGENT_ADDR
    decides, else the default: the agent's Unix socket if it exists, else UDP 127.0.0.1:9836, looked at
    again every DEFAULT_RECHECK_S while on UDP and whenever the Unix socket went away."""

    def __init__(self, address: tuple[str, int] | str | None = None) -> None:
        if isinstance(address, str) and address.startswith("unix:"):
            address = address[len("unix:"):]
        if address is None:
            address = _agent_address()
        self._default = address is None  # chosen here, and again when the agent's sockets change
        self.address = default_agent_address() if address is None else address
        self.sent = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = -1
        self._recheck_at = 0.0  # nonzero while the default fell back to UDP: when to look for the socket again

    def _socket(self, pid: int) -> socket.socket:
        # A forked child must not share its parent's socket object state; make a new one.
        if self._default:
            self.address = default_agent_address()
            self._recheck_at = 0.0 if isinstance(self.address, str) else time.monotonic() + DEFAULT_RECHECK_S
        family = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
        if self._sock is None or self._pid != pid or self._sock.family != family:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)  # a full agent queue (EAGAIN) is a drop, never a wait
            if self._sock is not None and self._pid == pid:
                self._sock.close()
            self._sock, self._pid = sock, pid
        return self._sock

    def emit(self, event: dict[str, Any]) -> bool:
        try:
            data = json.dumps(event, separators=(",", ":"), allow_nan=False).encode()
        except Exception as exc:  # never raise into the workload
            return self._drop(exc)
        return self._send(data)

    def _send(self, data: bytes, pid: int | None = None) -> bool:
        """Send one encoded event: what `emit` encodes, or a step or request that wrote itself (with its pid)."""
        try:
            if len(data) > MAX_DATAGRAM_BYTES:
                raise ValueError(f"event of {len(data)} bytes exceeds {MAX_DATAGRAM_BYTES}")
            if pid is None:
                pid = os.getpid()
            with self._lock:
                sock = self._sock
                if sock is None or self._pid != pid or (self._recheck_at and time.monotonic() > self._recheck_at):
                    sock = self._socket(pid)
                sock.sendto(data, self.address)
                self.sent += 1
            return True
        except Exception as exc:  # never raise into the workload
            if self._default and isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
                with self._lock:  # the agent's socket went away: choose again at the next event (closing this one)
                    self._recheck_at = float("-inf")
            return self._drop(exc)

    def _drop(self, exc: Exception) -> bool:
        with self._lock:
            self.dropped += 1
            first = self.dropped == 1
        if first:
            log.warning("fleetscope: dropping events (%s); further drops are only counted", exc)
        return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


_default_emitter: Emitter | None = None
_default_lock = threading.Lock()


def default_emitter() -> Emitter:
    global _default_emitter
    with _default_lock:
        if _default_emitter is None:
            _default_emitter = Emitter()
        return _default_emitter


def process_start_time(stat_path: str = "/proc/self/stat", proc_stat_path: str = "/proc/stat") -> float | None:
    """When the OS started this process (Unix time), from Linux's /proc; None where that cannot be read."""
    try:
        with open(stat_path) as fh:
            # Field 22 (starttime, in clock ticks after boot) counts from after the command name, which may
            # hold spaces and parentheses: split after its closing parenthesis.
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open(proc_stat_path) as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except Exception:  # not Linux, no /proc, a format we do not know: the caller falls back
        return None


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                log.warning("fleetscope: %s=%r is not an integer; ignoring it", name, value)
    return default


# The Slurm job's ids that go with every event (fleetscope.schema.SlurmIds): field -> environment variable.
SLURM_ENV = (("job", "SLURM_JOB_ID"), ("step", "SLURM_STEP_ID"), ("user", "SLURM_JOB_USER"),
             ("partition", "SLURM_JOB_PARTITION"), ("array_job", "SLURM_ARRAY_JOB_ID"),
             ("array_task", "SLURM_ARRAY_TASK_ID"), ("name", "SLURM_JOB_NAME"), ("restart_count", "SLURM_RESTART_COUNT"))


def slurm_ids(environ=None) -> dict[str, Any] | None:
    """This process's Slurm job from its SLURM_* environment (srun, sbatch), as the events carry it; None
    outside Slurm. Values the agent's schema would refuse (too long, control characters) are left out."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID", "")
    if not job.isdigit() or len(job) > 64:
        return None
    out: dict[str, Any] = {}
    for field, name in SLURM_ENV:
        value = env.get(name, "")
        if not value or len(value) > (256 if field in ("user", "partition", "name") else 64) \
                or any(ord(c) < 0x20 for c in value):
            continue
        if field == "restart_count":
            if value.isdigit():
                out[field] = int(value)
        else:
            out[field] = value
    return out


# Where a pod's service account token is mounted (unless automountServiceAccountToken: false).
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def pod_ids(environ=None, namespace_file: str | None = None) -> dict[str, str] | None:
    """This process's Kubernetes pod as it describes itself (fleetscope.schema.PodIds), None outside Kubernetes.

    POD_NAME and POD_NAMESPACE when the pod sets them from the downward API (metadata.name, metadata.namespace);
    else the namespace of its service account and its hostname, which is the pod's name unless the pod runs with
    hostNetwork (the node's name), sets spec.hostname, or has a name over 63 characters (cut): set POD_NAME there.
    The agent marks this unverified, and replaces it with what it reads itself for a Unix-socket sender."""
    env = os.environ if environ is None else environ
    namespace = env.get("POD_NAMESPACE", "")
    if not namespace:
        try:
            with open(namespace_file or SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as fh:
                namespace = fh.read(300).strip()
        except (OSError, ValueError):
            return None  # not in a pod, or one without its service account and without POD_NAMESPACE
    pod = env.get("POD_NAME", "")
    if not pod and env.get("KUBERNETES_SERVICE_HOST"):  # set in every container of a pod
        pod = env.get("HOSTNAME", "") or socket.gethostname()
    if not pod or any(not value or len(value) > 253 or any(ord(c) <= 0x20 for c in value) for value in (namespace, pod)):
        return None
    return {"namespace": namespace, "pod": pod}


def _add_ids(event: dict[str, Any], slurm: dict[str, Any] | None, pod: dict[str, str] | None) -> None:
    """Put the Slurm job's and the pod's ids (when there are any) on an event or a prefix's fields."""
    if slurm:
        event["slurm"] = slurm
    if pod:
        event["pod"] = pod


def _finite(value: float | int | None) -> float | int | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return value if number == number and abs(number) != float("inf") else None


# Steps and requests write their own JSON: json.dumps took 5 to 8 us an event, most of what a step cost
# its training loop, and most of that was float.__repr__ (0.5 to 0.7 us for a 17-digit duration).
# Times the client measures are written to the nanosecond (durations) and the microsecond (wall-clock
# starts), which is what the clocks resolve; values the user gives (metrics, queue time) as json.dumps
# writes them; a run's fixed fields once, by json.dumps. Only the usual types are written this way:
# anything else raises, and the event is built as a dict for json.dumps to encode or refuse (NaN,
# infinity), as it always was.
_STRINGS: dict[str, str] = {}  # names and statuses as JSON strings: a workload uses a few, again and again


def _json_str(text: str) -> str:
    encoded = _STRINGS.get(text)
    if encoded is None:
        if type(text) is not str:
            raise TypeError(f"not a str: {text!r}")
        encoded = json.dumps(text)
        if len(_STRINGS) < 1024 and len(text) <= 256:  # bounded, should a workload make names up as it goes
            _STRINGS[text] = encoded
    return encoded


_SECONDS: dict[tuple, str] = {}  # {"data":%.9f,...} for each set of phase names: a workload has one or two


def _json_seconds(values: dict[str, float]) -> str:
    """{name: seconds} as JSON, to the nanosecond; raises for anything but finite numbers."""
    names = tuple(values)
    template = _SECONDS.get(names)
    if template is None:
        template = "{" + ",".join([_json_str(name).replace("%", "%%") + ":%.9f" for name in names]) + "}"
        if len(_SECONDS) < 256:
            _SECONDS[names] = template
    if 0.0 * sum(values.values()) != 0.0:  # a NaN or an infinity in there: JSON has neither
        raise ValueError("not finite")
    return template % tuple(values.values())


def _json_floats(values: dict[str, float]) -> str:
    """{name: finite float} exactly as json.dumps writes it; raises for anything else."""
    if 0.0 * sum(values.values()) != 0.0:
        raise ValueError("not finite")
    return "{" + ",".join([f"{_json_str(name)}:{float.__repr__(value)}" for name, value in values.items()]) + "}"


def _json_prefix(fields: dict[str, Any]) -> str:
    """A run's fixed fields, as the opening of a JSON object that its events complete."""
    return json.dumps(fields, separators=(",", ":"), allow_nan=False)[:-1] + ","


def _cached_prefix(field: str) -> property:
    """A field that goes into a run's cached prefix: setting it makes the next event write a new one."""
    def get(self):
        try:
            return self.__dict__[field]
        except KeyError:
            raise AttributeError(field) from None

    def set(self, value) -> None:
        self.__dict__[field] = value
        self._prefix = None
    return property(get, set)


class Step:
    """One training step; use as a context manager via `TrainingRun.step()`."""

    __slots__ = ("run", "number", "tokens", "samples", "phases", "_t0", "_wall0", "_metrics")

    def __init__(self, run: "TrainingRun", number: int, tokens: int | None, samples: int | None) -> None:
        self.run = run
        self.number = number
        self.tokens = tokens
        self.samples = samples
        self.phases: dict[str, float] = {}
        self._metrics: dict[str, float] = {}
        self._t0 = 0.0
        self._wall0 = 0.0

    def record(self, **values: float) -> None:
        """Attach a few numbers to this step (loss, grad_norm, ...)."""
        for key, value in values.items():
            finite = _finite(value)
            if finite is not None:
                self._metrics[str(key)] = float(finite)

    def __enter__(self) -> "Step":
        self._wall0 = time.time()
        self._t0 = time.perf_counter()
        self.run._current = self
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        duration = time.perf_counter() - self._t0
        self.run._current = None
        try:
            self.run._emit_step(self, duration, failed=exc_type is not None)
        except Exception:  # never raise into the workload
            pass


class Phase(ContextDecorator):
    """A timed part of the current step, from `TrainingRun.phase()`: a `with` block or a decorator.

    A class, not a generator-based context manager, which cost about 0.8 us more per phase.
    """

    __slots__ = ("run", "name", "_t0")

    def __init__(self, run: "TrainingRun", name: str) -> None:
        self.run = run
        self.name = name
        self._t0 = 0.0

    def _recreate_cm(self) -> "Phase":  # a decorated function times each call afresh
        return Phase(self.run, self.name)

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, exc_type, exc, tb) -> None:
        elapsed = time.perf_counter() - self._t0
        step = self.run._current
        if step is not None:
            step.phases[self.name] = step.phases.get(self.name, 0.0) + elapsed


class TrainingRun:
    """Reports the steps of one rank of a training job."""

    job = _cached_prefix("job")
    rank = _cached_prefix("rank")
    world_size = _cached_prefix("world_size")
    local_rank = _cached_prefix("local_rank")
    stage = _cached_prefix("stage")
    flops_per_token = _cached_prefix("flops_per_token")
    slurm = _cached_prefix("slurm")
    pod = _cached_prefix("pod")

    _prefix: str | None = None  # the fixed fields of this run's step events, as JSON

    def __init__(
        self,
        job: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        stage: int | None = None,
        flops_per_token: float | None = None,
        emitter: Emitter | None = None,
    ) -> None:
        self.job = str(job)
        self.rank = rank if rank is not None else _env_int("RANK", "SLURM_PROCID", default=0)
        self.world_size = (
            world_size if world_size is not None else _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
        )
        self.local_rank = (
            local_rank if local_rank is not None else _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
        )
        # Pipeline-parallel stage, so a rank is compared with its own stage's peers (stages differ by design).
        self.stage = stage
        # Model FLOPs per token, forward and backward (about 6 x parameters for a dense transformer): for MFU.
        self.flops_per_token = flops_per_token
        # Under srun/sbatch: the Slurm job's ids, with every event (the collector links the job to them).
        self.slurm = slurm_ids()
        # In a Kubernetes pod: its name and namespace, with every event (the agent verifies them where it can).
        self.pod = pod_ids()
        self.emitter = emitter or default_emitter()
        self._next_step = 0
        self._current: Step | None = None
        # Sent with this run's first step (and the first after a restore), for the start-up time of goodput:
        # when the process started, else when the run was made.
        self.process_start_ts = process_start_time() or time.time()
        self._lifecycle: str | None = None
        self._mark_incarnation(None)

    def _mark_incarnation(self, restored_step: int | None) -> None:
        """The next step begins an incarnation: it carries the process start and the step restored, if any."""
        try:
            text = '"process_start_ts":%.6f' % float(self.process_start_ts)
            if restored_step is not None:
                text += ',"restored_step":%d' % int(restored_step)
            self._lifecycle = text
        except Exception:  # never raise into the workload
            self._lifecycle = None

    def restored(self, step: int) -> None:
        """Declare that this run resumed from a checkpoint taken at `step` (the number of the next step it
        runs): the first runs of the steps from there on were lost and are being recomputed. Step numbers
        continue from `step`."""
        try:
            step = int(step)
            if step < 0:
                raise ValueError(f"step {step} is negative")
        except Exception as exc:  # never raise into the workload
            log.warning("fleetscope: run.restored(%r) ignored: %s", step, exc)
            return
        self._next_step = step
        self._mark_incarnation(step)

    def step(self, *, tokens: int | None = None, samples: int | None = None, number: int | None = None) -> Step:
        if number is None:
            number = self._next_step
        self._next_step = number + 1
        return Step(self, number, tokens, samples)

    def phase(self, name: str) -> "Phase":
        """Time a part of the current step (data, forward, backward, optimizer, comm)."""
        return Phase(self, name)

    @contextmanager
    def pause(self, reason: str = "pause") -> Iterator[None]:
        """Declare time with no steps on purpose (checkpoint, evaluation): it must not look like a hang."""
        wall0, t0 = time.time(), time.perf_counter()
        self._emit_pause(reason, "begin", wall0, None)
        try:
            yield
        finally:
            self._emit_pause(reason, "end", time.time(), time.perf_counter() - t0)

    def _emit_pause(self, reason: str, phase: str, ts: float, duration: float | None) -> None:
        event: dict[str, Any] = {
            "v": SCHEMA_VERSION, "kind": "pause", "job": self.job, "rank": self.rank, "local_rank": self.local_rank,
            "world_size": self.world_size, "reason": str(reason), "phase": phase, "ts": ts, "pid": os.getpid(),
        }
        if duration is not None:
            event["duration_s"] = duration
        _add_ids(event, self.slurm, self.pod)
        try:
            self.emitter.emit(event)
        except Exception:  # never raise into the workload
            pass

    def _step_datagram(self, step: Step, duration: float, failed: bool) -> tuple[bytes, int]:
        """The event `_emit_step`'s dict holds, written by hand (see `_json_str`); raises for anything unusual."""
        if self._prefix is None:
            fields = {"v": SCHEMA_VERSION, "kind": "step", "job": self.job, "rank": self.rank,
                      "local_rank": self.local_rank, "world_size": self.world_size}
            if self.stage is not None:
                fields["stage"] = int(self.stage)
            if self.flops_per_token is not None:
                fields["flops_per_token"] = float(self.flops_per_token)
            _add_ids(fields, self.slurm, self.pod)
            self._prefix = _json_prefix(fields)
        pid = os.getpid()
        out = '%s"step":%d,"ts":%.6f,"duration_s":%.9f,"pid":%d' % (
            self._prefix, step.number, step._wall0, max(duration, 1e-9), pid)
        if step.tokens is not None:
            out += f',"tokens":{int(step.tokens)}'
        if step.samples is not None:
            out += f',"samples":{int(step.samples)}'
        if step.phases:
            out += ',"phases":' + _json_seconds(step.phases)
        if step._metrics:
            out += ',"metrics":' + _json_floats(step._metrics)
        if failed:
            out += ',"failed":true'
        if self._lifecycle is not None:
            out += "," + self._lifecycle
        return (out + "}").encode(), pid

    def _emit_step(self, step: Step, duration: float, failed: bool) -> None:
        try:
            data, pid = self._step_datagram(step, duration, failed)
        except Exception:  # something unusual: json.dumps decides, as it always did
            pass
        else:
            self._lifecycle = None
            self.emitter._send(data, pid)
            return
        event: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "kind": "step",
            "job": self.job,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "step": step.number,
            "ts": step._wall0,
            "duration_s": max(duration, 1e-9),
            "pid": os.getpid(),
        }
        if self.stage is not None:
            event["stage"] = int(self.stage)
        if self.flops_per_token is not None:
            event["flops_per_token"] = float(self.flops_per_token)
        _add_ids(event, self.slurm, self.pod)
        if step.tokens is not None:
            event["tokens"] = int(step.tokens)
        if step.samples is not None:
            event["samples"] = int(step.samples)
        if step.phases:
            event["phases"] = step.phases
        if step._metrics:
            event["metrics"] = step._metrics
        if failed:
            event["failed"] = True
        if self._lifecycle is not None:
            try:
                event.update(json.loads("{" + self._lifecycle + "}"))
            except Exception:
                pass
            self._lifecycle = None
        self.emitter.emit(event)


class Request:
    """One inference request; use as a context manager via `InferenceService.request()`."""

    __slots__ = ("service", "input_tokens", "output_tokens", "status", "queue_s", "_t0", "_wall0", "_first", "_end")

    def __init__(self, service: "InferenceService", input_tokens: int | None) -> None:
        self.service = service
        self.input_tokens = input_tokens
        self.output_tokens: int | None = None
        self.status = "ok"
        self.queue_s: float | None = None
        self._t0 = 0.0
        self._wall0 = 0.0
        self._first: float | None = None
        self._end: float | None = None

    def __enter__(self) -> "Request":
        self._wall0 = time.time()
        self._t0 = time.perf_counter()
        return self

    def queued(self, seconds: float) -> None:
        """Time the request waited before the server started on it."""
        self.queue_s = _finite(seconds)

    def first_token(self) -> None:
        if self._first is None:
            self._first = time.perf_counter()

    def finish(self, *, output_tokens: int | None = None, input_tokens: int | None = None, status: str = "ok") -> None:
        self._end = time.perf_counter()
        if output_tokens is not None:
            self.output_tokens = output_tokens
        if input_tokens is not None:
            self.input_tokens = input_tokens
        self.status = status

    def cancel(self) -> None:
        self.finish(status="cancelled")

    def __exit__(self, exc_type, exc, tb) -> None:
        end = self._end if self._end is not None else time.perf_counter()
        if exc_type is not None:
            self.status = "error"
        try:
            self.service._emit_request(self, end)
        except Exception:  # never raise into the workload
            pass


class InferenceService:
    """Reports the requests served by one replica of an inference service."""

    service = _cached_prefix("service")
    model = _cached_prefix("model")
    slurm = _cached_prefix("slurm")
    pod = _cached_prefix("pod")
    _prefix: str | None = None  # the fixed fields of this service's request events, as JSON

    def __init__(self, service: str, *, model: str, emitter: Emitter | None = None) -> None:
        self.service = str(service)
        self.model = str(model)
        self.slurm = slurm_ids()
        self.pod = pod_ids()
        self.emitter = emitter or default_emitter()

    def request(self, *, input_tokens: int | None = None) -> Request:
        return Request(self, input_tokens)

    def _request_datagram(self, req: Request, end: float) -> tuple[bytes, int]:
        """The event `_emit_request`'s dict holds, written by hand (see `_json_str`); raises for anything unusual."""
        if self._prefix is None:
            fields = {"v": SCHEMA_VERSION, "kind": "request", "service": self.service, "model": self.model}
            _add_ids(fields, self.slurm, self.pod)
            self._prefix = _json_prefix(fields)
        pid = os.getpid()
        out = '%s"ts":%.6f,"e2e_s":%.9f,"status":%s,"pid":%d' % (
            self._prefix, req._wall0, max(end - req._t0, 1e-9), _json_str(req.status), pid)
        if req._first is not None:
            out += f',"ttft_s":{max(req._first - req._t0, 0.0):.9f}'
            if req.output_tokens is not None and req.output_tokens > 1:
                tpot = max(end - req._first, 0.0) / (req.output_tokens - 1)
                if 0.0 * tpot != 0.0:
                    raise ValueError("not finite")
                out += f',"tpot_s":{tpot:.9f}'
        if req.queue_s is not None:
            if 0.0 * req.queue_s != 0.0:
                raise ValueError("not finite")
            out += f',"queue_s":{float.__repr__(req.queue_s)}'
        if req.input_tokens is not None:
            out += f',"input_tokens":{int(req.input_tokens)}'
        if req.output_tokens is not None:
            out += f',"output_tokens":{int(req.output_tokens)}'
        return (out + "}").encode(), pid

    def _emit_request(self, req: Request, end: float) -> None:
        try:
            data, pid = self._request_datagram(req, end)
        except Exception:  # something unusual: json.dumps decides, as it always did
            pass
        else:
            self.emitter._send(data, pid)
            return
        e2e = max(end - req._t0, 1e-9)
        event: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "kind": "request",
            "service": self.service,
            "model": self.model,
            "ts": req._wall0,
            "e2e_s": e2e,
            "status": req.status,
            "pid": os.getpid(),
        }
        if req._first is not None:
            event["ttft_s"] = max(req._first - req._t0, 0.0)
            if req.output_tokens is not None and req.output_tokens > 1:
                event["tpot_s"] = max(end - req._first, 0.0) / (req.output_tokens - 1)
        if req.queue_s is not None:
            event["queue_s"] = req.queue_s
        if req.input_tokens is not None:
            event["input_tokens"] = int(req.input_tokens)
        if req.output_tokens is not None:
            event["output_tokens"] = int(req.output_tokens)
        _add_ids(event, self.slurm, self.pod)
        self.emitter.emit(event)
