"""gRPC edge of the engine: the only engine module that sees protobuf objects.

The servicer, proto conversion, health, reflection, TLS, bind and `serve()`. The engine runs on
its own thread (`engine_loop.EngineLoop`); each Generate call opens a stream there (an asyncio
queue the loop feeds with `RequestOutput`s as soon as a step samples them).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine_svc.closing_health import ClosingHealthServicer
from engine_svc.engine import DuplicateRequestError, LLMEngine, QueueFullError, RequestOutput
from engine_svc.engine_loop import EngineLoop
from engine_svc.grammar import ResponseFormat
from engine_svc.liveness import LivenessWatch, Transition
from engine_svc.metrics import EngineMetrics
from engine_svc.params import FinishReason, SamplingParams, StoppingParams
from llmserve.v1 import engine_pb2, engine_pb2_grpc, generate_pb2

log = logging.getLogger("engine_svc")

MAX_REQUEST_ID_CHARS = 128

SERVICE_NAME = "llmserve.v1.Engine"
_FINISH_TO_PROTO = {
    FinishReason.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: generate_pb2.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: generate_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: generate_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.ABORTED: generate_pb2.FINISH_REASON_ABORTED,
}


def _sampling_from_proto(request: engine_pb2.EngineGenerateRequest) -> SamplingParams:
    msg = request.sampling
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k, min_p=msg.min_p,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        presence_penalty=msg.presence_penalty, frequency_penalty=msg.frequency_penalty,
        seed=msg.seed if msg.HasField("seed") else None, top_logprobs=request.top_logprobs,
        logit_bias=dict(request.logit_bias),
        response_format=_response_format_from_proto(request.response_format))


def _response_format_from_proto(msg: generate_pb2.ResponseFormat) -> ResponseFormat | None:
    kind = msg.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "choice":
        return ResponseFormat(kind, choices=tuple(msg.choice.values))
    return ResponseFormat(kind, "" if kind == "json_object" else getattr(msg, kind))


def _response(out: RequestOutput) -> engine_pb2.EngineGenerateResponse:
    msg = engine_pb2.EngineGenerateResponse(token_ids=out.token_ids, index=out.index)
    for i, (token, logprob) in enumerate(zip(out.token_ids, out.logprobs)):
        if out.top_logprobs:
            entry = msg.logprobs.add(token_id=token, logprob=logprob)
            for top_id, top_lp in out.top_logprobs[i]:
                entry.top.add(token_id=top_id, logprob=top_lp)
    if out.finished:
        msg.finish_reason = _FINISH_TO_PROTO[out.finish_reason]
        msg.usage.prompt_tokens = out.prompt_tokens
        msg.usage.completion_tokens = out.completion_tokens
        msg.usage.cached_prompt_tokens = out.cached_prompt_tokens
    return msg


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on time.monotonic()'s clock (None: the caller set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class EngineServicer(engine_pb2_grpc.EngineServicer):
    """llmserve.v1.Engine over an LLMEngine running on an EngineLoop."""

    def __init__(self, engine: LLMEngine, loop: EngineLoop, model_name: str) -> None:
        self.engine = engine
        self.engine_loop = loop
        self.model_name = model_name
        self.draining = False
        self.inflight = 0

    async def Generate(self, request, context):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "engine is shutting down")
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable "
                                f"characters, got {len(request_id)}")
        if self.engine_loop.has_stream(request_id):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id {request_id!r} is already in flight")
        queue = self.engine_loop.open_stream(request_id)
        finished = False
        self.inflight += 1
        try:
            if self.engine_loop.error is not None:  # checked after the queue is registered
                finished = True
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"engine loop crashed ({self.engine_loop.error!r}); the "
                                    f"engine is shutting down")
            try:
                sampling = _sampling_from_proto(request)
                stopping = StoppingParams(max_new_tokens=request.max_new_tokens,
                                          stop_token_ids=list(request.stop_token_ids),
                                          ignore_eos=request.ignore_eos,
                                          min_tokens=request.min_tokens)
                if sampling.response_format is not None:  # compile off the event loop (cached)
                    await asyncio.to_thread(self.engine.grammars.compile,
                                            sampling.response_format)
                samples = request.n or 1
                self.engine_loop.metrics.on_request_added(request_id, samples)
                self.engine.add_request(
                    request_id, list(request.prompt_token_ids), sampling, stopping, n=samples,
                    num_generated_prompt_tokens=request.num_generated_prompt_tokens,
                    deadline=_deadline(context))
            except QueueFullError as err:
                finished = True
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
            except DuplicateRequestError as err:
                finished = True
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(err))
            except ValueError as err:
                finished = True
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            while True:
                out = await queue.get()
                if out is None:
                    finished = True
                    await context.abort(grpc.StatusCode.INTERNAL,
                                        f"engine loop failed: {self.engine_loop.error!r}")
                yield _response(out)
                samples -= out.finished
                if samples == 0:   # every sample sent its last message
                    finished = True
                    return
        finally:
            self.inflight -= 1
            self.engine_loop.close_stream(request_id)
            if not finished:  # client went away (cancel, deadline): free its KV now
                self.engine.abort(request_id)

    async def Abort(self, request, context):
        found = self.engine.is_live(request.request_id)
        self.engine.abort(request.request_id,
                          request.index if request.HasField("index") else None)
        return engine_pb2.AbortResponse(found=found)

    async def CompileResponseFormat(self, request, context):
        fmt = _response_format_from_proto(request.response_format)
        if fmt is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "response_format must be set")
        try:
            await asyncio.to_thread(self.engine.grammars.compile, fmt)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return engine_pb2.CompileResponseFormatResponse()

    async def GetInfo(self, request, context):
        engine, runner = self.engine, self.engine.runner
        return engine_pb2.EngineInfo(
            model=self.model_name, dtype=str(runner.dtype).removeprefix("torch."),
            device=str(runner.device), backend=runner.backend,
            max_model_len=engine.max_model_len, kv_pool_capacity_tokens=engine.pool.capacity,
            vocab_size=engine.model_config.vocab_size,
            eos_token_ids=sorted(engine.eos_ids))


class BindError(RuntimeError):
    """The gRPC port could not be bound."""


def load_server_credentials(cert: str | None, key: str | None,
                            client_ca: str | None = None) -> grpc.ServerCredentials | None:
    """TLS from PEM files (None: plaintext). With client_ca, clients must present a certificate
    signed by it (mutual TLS)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("--tls-ca (require client certificates) needs --tls-cert/--tls-key")
        return None
    if cert is None or key is None:
        raise ValueError("--tls-cert and --tls-key must be given together")
    files = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": client_ca}
    pem = {}
    for flag, path in files.items():
        try:
            pem[flag] = None if path is None else open(path, "rb").read()
        except OSError as err:
            raise ValueError(f"{flag} {path}: {err.strerror}") from None
    return grpc.ssl_server_credentials([(pem["--tls-key"], pem["--tls-cert"])],
                                       root_certificates=pem["--tls-ca"],
                                       require_client_auth=client_ca is not None)


async def serve(engine: LLMEngine, *, host: str, port: int, metrics_port: int | None,
                model_name: str, drain_timeout: float = 30.0,
                server_credentials: grpc.ServerCredentials | None = None,
                max_message_bytes: int = 4 * 1024 * 1024,
                engine_thread: ThreadPoolExecutor | None = None, stream_interval: int = 1) -> int:
    """Serve until SIGTERM/SIGINT, drain in-flight streams and return 0; or, if the engine loop
    crashes, go NOT_SERVING, fail the open streams and return 1 (so a supervisor restarts us).

    stream_interval: tokens per streamed message after a request's first (see stream_interval.py).
    """
    import signal

    loop = asyncio.get_running_loop()
    metrics = EngineMetrics(engine)
    if metrics_port is not None:
        metrics.serve(metrics_port, host)
    stop = asyncio.Event()
    engine_loop = EngineLoop(engine, metrics, loop, on_crash=stop.set, engine_thread=engine_thread,
                             stream_interval=stream_interval)
    servicer = EngineServicer(engine, engine_loop, model_name)
    server, health_servicer = _build_server(servicer, max_message_bytes)
    address = f"{host}:{port}"
    _bind(server, address, server_credentials)
    await _publish_health(health_servicer, False)
    await server.start()
    log.info("engine listening on %s (%s; NOT_SERVING until warm)", address,
             "TLS" if server_credentials else "plaintext")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    engine_loop.start()
    await engine_loop.warm_up()
    watch: asyncio.Task | None = None
    if engine_loop.error is None and not stop.is_set():
        await _publish_health(health_servicer, True)
        log.info("engine SERVING on %s", address)
        watch = asyncio.create_task(_watch_liveness(engine_loop, health_servicer, servicer,
                                                    engine.config.stall_timeout_s))
    await stop.wait()
    servicer.draining = True
    if watch is not None:
        watch.cancel()
    await _publish_health(health_servicer, False)
    if engine_loop.error is None:
        log.info("draining: %d in-flight streams", servicer.inflight)
        deadline = loop.time() + drain_timeout
        while servicer.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
    health_servicer.close_watches()   # watchers saw NOT_SERVING; end their streams with OK
    await server.stop(grace=1.0)
    engine_loop.stop()
    if engine_loop.error is not None:
        log.error("engine stopped after the engine loop crashed: exit status 1")
        return 1
    log.info("engine stopped")
    return 0


async def _watch_liveness(engine_loop: EngineLoop, health_servicer: health.aio.HealthServicer,
                          servicer: EngineServicer, timeout_s: float) -> None:
    """NOT_SERVING (a stall counted and logged with its step) while the engine loop finishes no
    step for timeout_s with work pending; SERVING again once it moves (unless draining)."""
    watch = LivenessWatch(timeout_s)
    while True:
        await asyncio.sleep(min(1.0, timeout_s / 4))
        now, progress = time.monotonic(), engine_loop.progress()
        change = watch.check(now, progress)
        if change is None:
            continue
        if change is Transition.STALLED:
            engine_loop.metrics.stalls.inc()
            log.error("%s; health NOT_SERVING until it moves", watch.describe(now, progress))
        else:
            log.warning("engine loop is making progress again; health SERVING")
        if not servicer.draining:
            await _publish_health(health_servicer, change is Transition.MOVING)


def _build_server(servicer: EngineServicer, max_message_bytes: int
                  ) -> tuple[grpc.aio.Server, ClosingHealthServicer]:
    """The gRPC server with Engine, health and reflection; SO_REUSEPORT off (one process/port)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.max_send_message_length", max_message_bytes),
                                      ("grpc.so_reuseport", 0)])
    engine_pb2_grpc.add_EngineServicer_to_server(servicer, server)
    health_servicer = ClosingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    return server, health_servicer


def _bind(server: grpc.aio.Server, address: str,
          credentials: grpc.ServerCredentials | None) -> None:
    try:
        bound = (server.add_secure_port(address, credentials) if credentials
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if not bound:
        raise BindError(f"could not bind gRPC to {address} (in use, or not an address of "
                        f"this machine)")


async def _publish_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
