"""Two training stages in one process, as a long-lived training worker runs a job's stages (one worker, gloo):
prints, as JSON, how many DeepSpeed engines and optimizers are still alive after each stage.

    python tests/scripts/stage_memory.py MODEL SCORED_PAIRS REFERENCE OUT_DIR
"""

import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root


def alive(*names: str) -> int:
    return sum(type(o).__name__ in names for o in gc.get_objects())


def main(model: str, data: str, reference: str, out: Path) -> None:
    import torch.distributed

    from actors.trainer import TrainConfig, _train_stage
    from jobs.common import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    config = TrainConfig(mode="dpo", lr=1e-3, batch_size=8, num_workers=1, epochs=1, checkpoint_every=10**6)
    after = []
    for i in range(2):  # what the first leaves alive, the second adds to
        stage = {"name": f"stage{i}", "train": config.model_dump(), "init_model": model, "data": data,
                 "output_dir": str(out / f"model{i}"), "checkpoints": str(out / f"checkpoints{i}"), "max_length": 96,
                 "reference": reference, "trust_remote_code": False, "fingerprint": "test", "tensorboard_dir": None}
        _train_stage(stage, 0, 1, False, [None])
        gc.collect()
        after.append({"engines": alive("DeepSpeedEngine"),
                      "optimizers": alive("DeepSpeedZeroOptimizer_Stage3", "AdamW")})
    print(json.dumps(after))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
