"""Run by tests/pipelines/test_compile_counts.py in a fresh process: load the tiny engine with torch.compile
(dynamo traces for real; the eager backend skips code generation), run the whole warm-up plan for N variants,
S sizes and every batch bucket, then print what dynamo built as JSON.

    python -m tests.pipelines.compile_count_probe CACHE_DIR HUB N_VARIANTS SIZES [BACKEND]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    cache_dir, hub, n_variants, sizes = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    backend = sys.argv[5] if len(sys.argv) > 5 else "eager"
    started = time.perf_counter()
    from torch._dynamo.utils import counters

    from pipelines.engine import Engine
    from pipelines.hub import Resolver
    from pipelines.optimize import SpeedOptions
    from pipelines.specs import load_serving_spec
    from pipelines.warmup import plan_warmup, run_units

    spec = load_serving_spec()
    variants = sorted((app.app_id, n) for app in spec.apps.values() for n in app.steps)[:n_variants]
    speed = SpeedOptions(compile=True, compile_backend=backend, cache_dir=cache_dir)
    engine = Engine.load(
        spec,
        resolver=Resolver(cache_dir=hub, local_files_only=True),
        variants=variants,
        safety_checker=False,
        prompt_expansion=False,
        speed=speed,
    )
    served = [tuple(int(v) for v in size.split("x")) for size in sizes.split(",")]
    plan = plan_warmup(engine, served, served[0])
    run_units(engine, plan.ready + plan.later, "probe")
    blocks = {
        (m.norm1.normalized_shape, m.attn1.heads, m.attn2.heads if m.attn2 else None)
        for pipe in {id(p): p for p in (engine.pipeline(v) for v in engine.variants.values())}.values()
        for m in pipe.unet.modules()
        if type(m).__name__ == "BasicTransformerBlock"
    }
    print(
        json.dumps(
            {
                "graphs": counters["stats"]["unique_graphs"],
                "fx_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
                "fx_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
                "block_kinds": len(blocks),
                "runs": len(plan.ready) + len(plan.later),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
