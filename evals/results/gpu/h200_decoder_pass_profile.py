"""One plain transformers decoder pass of the SmolLM2-135M shape on a GPU (random bf16 weights,
a 545-token cache), sdpa vs eager attention, and the profiler's table of one pass: what
h200_decoder_pass_profile.txt holds. Run from the repository root."""

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer, DynamicCache

sys.path.insert(0, "benchmarks")
import bench_gpu as b  # noqa: E402

tok = AutoTokenizer.from_pretrained(b.TOKENIZER, local_files_only=True)
print(torch.__version__, torch.backends.cuda.flash_sdp_enabled(),
      torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
for impl in ("sdpa", "eager"):
    model = b.random_model("smollm2-135m", len(tok), "cuda")
    model.config._attn_implementation = impl
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = impl
    dec = model.get_decoder()
    ids = torch.randint(100, 4000, (1, 545), device="cuda")
    with torch.inference_mode():
        for q in (1, 4):
            ts = []
            for _ in range(8):
                cache = DynamicCache(config=model.config)
                dec(input_ids=ids, past_key_values=cache, use_cache=True)
                step = torch.randint(100, 4000, (1, q), device="cuda")
                pos = torch.arange(545, 545 + q, device="cuda")[None]
                torch.cuda.synchronize()
                t = time.perf_counter()
                dec(input_ids=step, past_key_values=cache, use_cache=True, position_ids=pos)
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t) * 1000)
            print(impl, "q", q, "pass ms median", round(statistics.median(ts), 2),
                  [round(x, 1) for x in ts])
        if impl == "sdpa":
            cache = DynamicCache(config=model.config)
            dec(input_ids=ids, past_key_values=cache, use_cache=True)
            step = torch.randint(100, 4000, (1, 1), device="cuda")
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                dec(input_ids=step, past_key_values=cache, use_cache=True,
                    position_ids=torch.tensor([[545]], device="cuda"))
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                            max_name_column_width=40))
    del model, dec
    torch.cuda.empty_cache()
