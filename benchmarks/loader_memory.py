"""Peak host memory of `load_model`: it should be about one copy of the weights.

    .venv/bin/python benchmarks/loader_memory.py [--model DIR] [--shape gpt2]

Without --model it saves a random model of the given shape to a temporary directory first. The load
runs in a fresh process. Reported: anonymous resident memory (RssAnon, sampled every 2 ms: the
process's own allocations) before, after and at peak, and the kernel's high-water mark of all
resident memory (VmHWM), which also counts the safetensors file pages mapped while reading
(page cache, given back under memory pressure).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, threading, time, torch
from coconut_engine.loader import load_model

def anon_mb():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) / 1024

peak = [anon_mb()]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.002)
before = anon_mb()
thread = threading.Thread(target=sample)
thread.start()
model = load_model(sys.argv[1])
done.set()
thread.join()
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"weights_mb": weights, "anon_before_mb": before, "anon_after_mb": anon_mb(),
                  "anon_peak_mb": max(peak[0], anon_mb()),
                  "vm_hwm_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(model_dir: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model_dir], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["anon_peak_increase_mb"] = result["anon_peak_mb"] - result["anon_before_mb"]
    result["anon_peak_over_weights"] = result["anon_peak_increase_mb"] / result["weights_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face model directory")
    parser.add_argument("--shape", default="gpt2", help="random model shape when --model is not given")
    args = parser.parse_args()
    if args.model:
        print(json.dumps(measure(args.model), indent=2))
        return
    from coconut_engine.bench import build_random_model
    from coconut_engine.loader import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_random_model(args.shape), tmp)
        print(json.dumps(measure(tmp), indent=2))


if __name__ == "__main__":
    main()
