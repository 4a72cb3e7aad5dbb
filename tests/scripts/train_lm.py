"""A small LM training run on its own local Ray instance, for the kill-and-resume test.

    python tests/scripts/train_lm.py <init_model> <corpus.parquet> <output_dir> <storage_dir>
"""

import sys

import ray

from actors.trainer import TrainConfig, train

if __name__ == "__main__":
    init_model, corpus, output_dir, storage = sys.argv[1:5]
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    config = TrainConfig(mode="lm", lr=1e-3, epochs=6, batch_size=16, num_workers=2, checkpoint_every=5, log_every=5)
    summary = train(config, init_model, corpus, output_dir, name="resume-test", storage_dir=storage)
    print("TRAIN_DONE", summary["steps"], flush=True)
