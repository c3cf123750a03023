"""Freed activations stay in the process: conv-tower passes on CPU stop faulting their memory in."""
import functools
import os
import subprocess
import sys

# Two conv-tower passes of a 384-channel model (activations of ~300 MB) after a warm-up pass,
# counting the minor page faults they take.
SCRIPT = """
import resource
import torch
from enformer_vep.allocator import keep_freed_memory
from enformer_vep.model import Enformer, EnformerConfig
applied = keep_freed_memory()
torch.manual_seed(0)
model = Enformer(EnformerConfig(channels=384, num_heads=8, num_transformer_layers=1, heads={"human": 4})).eval()
x = torch.nn.functional.one_hot(torch.randint(0, 4, (1, 196_608)), 4).float()
with torch.inference_mode():
    model.convolve(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        model.convolve(x)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(malloc: str) -> tuple[bool, int]:
    env = dict(os.environ, ENFORMER_VEP_MALLOC=malloc)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True,
                         timeout=300).stdout
    applied, count = out.split()
    return applied == "True", int(count)


def test_freed_activations_are_reused_without_page_faults():
    applied, kept = faults("")
    not_applied, system = faults("system")
    assert applied and not not_applied
    # measured here: ~2.3 million faults with glibc's defaults, ~25,000 with the setting
    assert kept * 10 < system, (kept, system)



# Transient activations that grow a little each time, with a small tensor kept after each, as
# tiles and cached buffers are: the kept heap fragments (each freed activation is a resident hole too
# small for the next one) and the process grows by every activation's size.
FRAGMENTING_SCRIPT = """
import sys
import torch
from enformer_vep.allocator import FreedMemoryGuard, configure_cpu_memory, resident_mib
configure_cpu_memory()
guard, guarded = FreedMemoryGuard(), sys.argv[1] == "guard"
kept, sizes = [], []
for i in range(60):
    activation = torch.ones((40 + i) * 2**18)  # (40 + i) MiB, written
    kept.append(torch.ones(2**14))
    del activation
    if guarded:
        guard.check()
    sizes.append(resident_mib())
print(sizes[0], max(sizes), sizes[-1], guard.trims)
"""


def resident_sizes(mode: str) -> tuple[float, float, float, int]:
    out = subprocess.run([sys.executable, "-c", FRAGMENTING_SCRIPT, mode], capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    return float(out[0]), float(out[1]), float(out[2]), int(out[3])


def test_guard_returns_fragmented_memory():
    first, _, unguarded, _ = resident_sizes("none")
    # measured here: 260 MiB -> 4,350 MiB unguarded; guarded, 5 trims, peak 1,690 MiB, 610 MiB at the end
    assert unguarded > 10 * first, "the script no longer fragments: the test would prove nothing"
    _, peak, last, trims = resident_sizes("guard")
    assert trims >= 1 and peak < unguarded / 2 and last < unguarded / 4, (peak, last, unguarded, trims)


def test_primitive_cache_is_capped_unless_the_user_set_it():
    script = "from enformer_vep.allocator import bound_primitive_cache; print(bound_primitive_cache())"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = functools.partial(subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run(env=env).stdout.split() == ["64"]
    assert run(env=dict(env, ONEDNN_PRIMITIVE_CACHE_CAPACITY="7")).stdout.split() == ["7"]
