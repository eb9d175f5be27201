"""CPU wall time and peak memory of `vertebraid detect` on a 512x512x400 CT at 0.8x0.8x1 mm.

    python bench/detect_speed.py [--model M] [--threads 2] [--keep DIR]

Generates one phantom of that size (seed 1, T1..S2 visible), writes it as NIfTI, then runs
`vertebraid detect` on it in a child process and reports the child's wall time and peak
resident memory (the issue's target: <= 60 s and <= 4 GB on a 2-core machine). Without
--model it uses the bundled model, or, while none is installed, an untrained network of the
default architecture (the timing does not depend on the weights) and says so.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file (default: bundled, else an untrained default network)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in the child (default 2)")
    parser.add_argument("--keep", help="folder for the CT and outputs (default: a temporary folder)")
    args = parser.parse_args()

    from VertebraIDLib.io.images import write_nifti
    from VertebraIDLib.networks import bundle as net
    from VertebraIDLib.synthetic.phantom import generate_phantom

    work = Path(args.keep or tempfile.mkdtemp(prefix="vid-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ct_path = work / "bench512_ct.nii.gz"
    if not ct_path.exists():
        t0 = time.perf_counter()
        phantom = generate_phantom(1, shape=(512, 512, 400), spacing=(0.8, 0.8, 1.0), levels="T6..S2",
                                   orientation="LPS", pathologies=[])
        import numpy as np

        write_nifti(phantom.ct, ct_path, dtype=np.int16)
        print(f"phantom 512x512x400 generated and written in {time.perf_counter() - t0:.1f} s")
    model = args.model or (str(net.bundled_model_path()) if net.bundled_model_path() else None)
    note = ""
    if model is None:
        model = str(work / "untrained.safetensors")
        config = net.NetworkConfig()
        meta = net.make_metadata(config, spacing_mm=4.0, patch_size=96, sigma_mm=6.0, hu_window=(-250, 1250))
        net.save_model(net.build_network(config), meta, model)
        note = " (untrained default network: no bundled model yet)"
    out = work / "out"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "VertebraIDLib.cli", "detect", str(ct_path), "-o", str(out), "--model", model,
           "--device", "cpu", "--overwrite"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    print(done.stdout.strip() or done.stderr.strip())
    print(f"| input | model | threads | wall (s) | peak RSS (GB) |\n|---|---|---|---|---|\n"
          f"| 512x512x400 @ 0.8x0.8x1 mm | {Path(model).name}{note} | {args.threads} | {wall:.1f} | {peak_gb:.2f} |")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
