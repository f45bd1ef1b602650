"""`python -m tokenizer_svc --model DIR --engine HOST:PORT ...` (see --help)."""
from __future__ import annotations

import asyncio
import logging
import sys

from tokenizer_svc.config import build_arg_parser, config_from_args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(argv)
    except ValueError as error:
        build_arg_parser().error(str(error))
    from tokenizer_svc.app import serve  # imports grpc + the generated stubs

    try:
        return asyncio.run(serve(config))
    except ValueError as error:  # e.g. a model directory without tokenizer files
        print(f"tokenizer_svc: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
