"""One continual run in every rank (started by tests/test_distributed_run.py and tests/test_fsdp_run.py
under torchrun).

Each rank saves what the tests compare, beside the run directory: its R, its trainable weights
(whole: FSDP shards all-gathered) and how many of their entries the rank itself holds, the same
count for the 4-bit base weights of a QLoRA run, and what each stage trained on after every strategy's
``train_data``: examples per task, SSR's synthetic ones apart (``<task>:ssr``).
"""

import json
import sys
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from continual_ft.config import make_config
from continual_ft.run import runner
from continual_ft.run.runner import run
from continual_ft.strategies import STRATEGIES
from continual_ft.train.distributed import get_dist

if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    trained, train_stage = [], runner.train_stage

    def recording(model, encoder, examples, *args, **kwargs):
        trained.append(Counter(e.task + (":ssr" if e.group.startswith("ssr:") else "") for e in examples))
        return train_stage(model, encoder, examples, *args, **kwargs)

    runner.train_stage = recording
    results = run(make_config(overrides, tuple(STRATEGIES)), progress=False)
    dist = get_dist()
    lora = {n: p for n, p in results.model.named_parameters() if "lora_" in n}
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in lora.values())
    weights = {n: t.contiguous() for n, t in dist.full_tensors(lora).items()}
    save_file(weights, str(out / f"rank{dist.rank}.safetensors"))
    info = {"R": results.data["R"], "world": dist.world, "fsdp": dist.is_fsdp, "held": held, "trained": trained}
    four_bit = [m.weight for m in results.model.modules() if type(m).__name__ == "Linear4bit"]  # quantize=nf4
    info["4bit"] = {
        "held": sum((w.to_local() if isinstance(w, DTensor) else w).numel() for w in four_bit),
        "total": sum(w.numel() for w in four_bit),
        "dtypes": sorted({str(w.dtype) for w in four_bit}),
    }
    (out / f"rank{dist.rank}.json").write_text(json.dumps(info))
    dist.close()
