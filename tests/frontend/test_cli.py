"""The command lines: `python -m tokenizer_svc.client`, `python -m tokenizer_svc` (help, drain)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmserve.v1 import generate_pb2, generate_pb2_grpc
from tests.fakes.fake_engine import FakeEngine, FakeEngineServer, ScriptedReply
from tests.frontend.harness import (REPLY_TEXT, free_port, model_dir, reply_ids, running_stack,
                                    shared_tokenizer, wait_until)
from tests.fakes.tiny_tokenizer import REPO_ROOT

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


async def run_module(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, cwd=REPO_ROOT, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, stdout.decode(), stderr.decode()


def test_client_streams_text_and_reports_usage() -> None:
    async def body() -> None:
        async with running_stack() as s:
            server = f"127.0.0.1:{s.frontend.port}"
            code, out, err = await run_module(
                "tokenizer_svc.client", "--server", server, "--chat", "--system", "Be brief.",
                "--max-new-tokens", "64", "--temperature", "0", "--stop", "zzz", "Hi there")
            assert code == 0, err
            assert out == REPLY_TEXT + "\n"
            assert (f"[finish_reason=EOS prompt_tokens={len(s.engine.record.requests[0].prompt_token_ids)} "
                    f"completion_tokens={len(reply_ids())} cached_prompt_tokens=0]") in err
            sent = s.engine.record.requests[0]
            assert sent.max_new_tokens == 64 and sent.sampling.HasField("temperature")
            assert sent.sampling.temperature == 0.0
            code, out, err = await run_module("tokenizer_svc.client", "--server", server,
                                              "--top-p", "1.5", "x")
            assert code == 1 and "error: INVALID_ARGUMENT: sampling.top_p must be in (0, 1]" in err
    asyncio.run(body())


def test_client_reports_unreachable_server() -> None:
    code, _, err = asyncio.run(run_module("tokenizer_svc.client", "--server",
                                          f"127.0.0.1:{free_port()}", "--timeout", "5", "hi"))
    assert code == 1 and "error: UNAVAILABLE" in err


def test_service_help_explains_every_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "tokenizer_svc", "--help"], cwd=REPO_ROOT,
                            env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--model", "--engine", "--host", "--port", "--metrics-port",
                 "--max-concurrent", "--grace-period", "--engine-poll-interval"):
        assert flag in result.stdout, flag


def test_sigterm_drains_in_flight_stream_then_exits_zero() -> None:
    async def body() -> None:
        tokenizer = shared_tokenizer()
        engine = FakeEngine(lambda r: ScriptedReply(reply_ids(), delay_s=0.03),
                            vocab_size=tokenizer.vocab_size,
                            eos_token_ids=tuple(tokenizer.eos_token_ids))
        engine_server = FakeEngineServer(engine)
        await engine_server.start()
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenizer_svc", "--model", str(model_dir()),
            "--engine", engine_server.address, "--port", str(port), "--metrics-port", "0",
            "--http-port", "0", "--engine-poll-interval", "0.1", "--grace-period", "20",
            cwd=REPO_ROOT, env=ENV,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.aio.AioRpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            await wait_until(serving, 60, "tokenizer_svc never became SERVING")
            stub = generate_pb2_grpc.TextGenerationStub(channel)
            call = stub.Generate(generate_pb2.GenerateRequest(prompt="hi"), timeout=30)
            messages = [await call.read()]
            process.send_signal(signal.SIGTERM)
            while (message := await call.read()) is not grpc.aio.EOF:
                messages.append(message)
            assert "".join(m.text for m in messages) == REPLY_TEXT  # the stream finished
            assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_EOS
            code = await asyncio.wait_for(process.wait(), 30)
            stderr = (await process.stderr.read()).decode()
            assert code == 0, stderr
            assert "draining" in stderr
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await channel.close()
            await engine_server.stop()
    asyncio.run(body())
