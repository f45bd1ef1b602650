"""Command-line client of llmserve.v1.TextGeneration: streams a completion to stdout.

python -m tokenizer_svc.client [--server HOST:PORT] [--chat] [--system TEXT] [--max-new-tokens N]
    [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop S]... "prompt"
"""
from __future__ import annotations

import argparse
import os
import sys
import uuid

import grpc

from llmserve.v1 import generate_pb2, generate_pb2_grpc


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tokenizer_svc.client",
        description="Send one Generate request to the llmserve tokenizer service and print the "
                    "text as it streams; finish reason and token usage go to stderr.")
    parser.add_argument("prompt", help="the prompt text (the user message with --chat)")
    parser.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT",
                        help="address of the tokenizer service (default: %(default)s)")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user chat message (model's chat template)")
    parser.add_argument("--system", metavar="TEXT",
                        help="system message to put before the user message (implies --chat)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N",
                        help="generation budget (default: the server's)")
    parser.add_argument("--temperature", type=float, metavar="T",
                        help="sampling temperature; 0 = greedy (default: 1.0)")
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1]")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely")
    parser.add_argument("--seed", type=int, metavar="S", help="seed for reproducible sampling")
    parser.add_argument("--stop", action="append", default=[], metavar="S",
                        help="stop string (repeatable); the output is cut before it")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past eos tokens")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="deadline of the whole call (default: %(default)s)")
    parser.add_argument("--tls-ca", metavar="PEM",
                        help="connect over TLS, trusting this CA for the server's certificate")
    parser.add_argument("--tls-cert", metavar="PEM",
                        help="client certificate, for a server started with --tls-ca")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--api-key-env", default="LLMSERVE_API_KEY", metavar="VAR",
                        help="environment variable holding the API key sent as "
                             "'authorization: Bearer KEY' when set (default: %(default)s)")
    return parser


def open_channel(server: str, args: argparse.Namespace) -> grpc.Channel:
    """Plaintext channel, or TLS when --tls-ca/--tls-cert is given."""
    if args.tls_ca is None and args.tls_cert is None:
        return grpc.insecure_channel(server)

    def read(path: str | None) -> bytes | None:
        return None if path is None else open(path, "rb").read()

    credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key),
                                               read(args.tls_cert))
    return grpc.secure_channel(server, credentials)


def build_request(args: argparse.Namespace) -> generate_pb2.GenerateRequest:
    """The GenerateRequest described by the command line."""
    request = generate_pb2.GenerateRequest(request_id=f"cli-{uuid.uuid4().hex[:12]}")
    if args.chat or args.system is not None:
        if args.system is not None:
            request.chat.messages.add(role="system", content=args.system)
        request.chat.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    for flag, field_name in (("temperature", "temperature"), ("top_p", "top_p"),
                             ("top_k", "top_k"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            setattr(request.sampling, field_name, value)
    if args.max_new_tokens is not None:
        request.stopping.max_new_tokens = args.max_new_tokens
    request.stopping.stop.extend(args.stop)
    request.stopping.ignore_eos = args.ignore_eos
    return request


def stream_completion(server: str, request: generate_pb2.GenerateRequest,
                      timeout_s: float, channel: grpc.Channel | None = None,
                      api_key: str | None = None) -> generate_pb2.GenerateResponse | None:
    """Print text deltas as they arrive; return the last message."""
    last = None
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
    with channel or grpc.insecure_channel(server) as channel:
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        for message in stub.Generate(request, timeout=timeout_s, metadata=metadata):
            if message.text:
                sys.stdout.write(message.text)
                sys.stdout.flush()
            last = message
    return last


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        request = build_request(args)
        last = stream_completion(args.server, request, args.timeout,
                                 open_channel(args.server, args),
                                 os.environ.get(args.api_key_env) or None)
    except grpc.RpcError as error:
        sys.stdout.write("\n")
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as error:  # e.g. a negative --top-k (uint32)
        print(f"error: {error}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is None:
        print("error: the server closed the stream without a message", file=sys.stderr)
        return 1
    reason = generate_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_")
    usage = last.usage
    print(f"[finish_reason={reason} prompt_tokens={usage.prompt_tokens} "
          f"completion_tokens={usage.completion_tokens} "
          f"cached_prompt_tokens={usage.cached_prompt_tokens}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
