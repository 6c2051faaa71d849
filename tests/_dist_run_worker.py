"""One continual run in every rank (started by tests/test_distributed_run.py under torchrun).

Each rank saves what the test compares, beside the run directory: its R and its trainable weights.
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from continual_ft.config import make_config
from continual_ft.distributed import get_dist
from continual_ft.runner import run
from continual_ft.strategies import STRATEGIES

if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    results = run(make_config(overrides, tuple(STRATEGIES)), progress=False)
    dist = get_dist()
    weights = {n: p.detach().contiguous() for n, p in results.model.named_parameters() if "lora_" in n}
    save_file(weights, str(out / f"rank{dist.rank}.safetensors"))
    (out / f"rank{dist.rank}.json").write_text(json.dumps({"R": results.data["R"], "world": dist.world}))
    dist.close()
