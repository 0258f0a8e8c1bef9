"""``mlaas4hep flatten`` end to end against the same-output single-process script.

Run from the repository root (one command; a few minutes at full size on 2 cores)::

    .venv/bin/python benchmarks/flatten_command.py              # --events 200000
    .venv/bin/python benchmarks/flatten_command.py --events 20000   # quick

It writes the *wide* file of ``data_throughput.py`` (every numeric branch of the NanoAOD
sample, its events replicated to ``--events``, baskets of 10,000 events), then measures,
wall clock from the command line to the last file written, each in a fresh process:

* **script**: what a physicist writes without the platform, in one process: uproot and
  awkward, the file read twice (min/max/longest list, then normalize and pad), the same
  Parquet schema (``features`` fixed_size_list<float32>, ``mask`` fixed_size_list<uint8>,
  ``label``), Snappy with pyarrow's other defaults; its time writing Parquet is shown;
* **command, cold**: ``mlaas4hep flatten SPEC --out DIR`` with no Ray running (it chooses
  local execution: processes forked from the command);
* **command, cold, Ray**: the same with ``--execution ray`` (it starts a Ray of its own);
* **command, running head** (first and second command): a platform head is started
  first (not timed); the command still chooses local execution for local files, and
  with ``--execution ray`` runs on the head;
* **read-only limit**: uproot reading the same branches of every entry in two processes
  (one per core), nothing else: the rate no flattening of this file can beat here.

Every output is checked against the script's (same values, mask and label). It prints a
table and writes JSON to ``benchmarks/results/flatten_command.json`` with the machine and
its load average around every row.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from data_throughput import DATA, RESULTS, machine, replicate

NANOAOD = DATA / "nanoAOD_2015_CMS_Open_Data_ttbar.root"
MLAAS4HEP = Path(sys.executable).parent / "mlaas4hep"


# --- the same-output script ----------------------------------------------------------------

SCRIPT = '''\
"""Flatten a TTree to Parquet with uproot + awkward: two passes, one process."""
import math, sys, time
import awkward as ak, numpy as np, pyarrow as pa, pyarrow.parquet as pq, uproot

path, out, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
tree = uproot.open(path)["Events"]
names = [n for n in tree.keys() if not tree[n].branches]

# pass 1: the range of every branch and the longest list of every jagged one
low, high, jdim, jagged = {}, {}, {}, {}
for arrays in tree.iterate(names, step_size=step, library="ak"):
    for name in names:
        column = arrays[name]
        jagged[name] = column.ndim > 1
        values = ak.to_numpy(ak.flatten(column, axis=None)).astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            low[name] = min(low.get(name, math.inf), values.min())
            high[name] = max(high.get(name, -math.inf), values.max())
        if jagged[name]:
            jdim[name] = max(jdim.get(name, 0), int(ak.max(ak.num(column, axis=1), initial=0)))

def scaled(values, name):  # (v - min) / (max - min); unchanged without a range
    lo, hi = low.get(name, math.inf), high.get(name, -math.inf)
    return values if lo >= hi else (values - lo) / (hi - lo)

flat_names = [n for n in names if not jagged[n]]
jagged_names = [n for n in names if jagged[n]]
width = len(flat_names) + sum(jdim[n] for n in jagged_names)
schema = pa.schema([("features", pa.list_(pa.float32(), width)),
                    ("mask", pa.list_(pa.uint8(), width)), ("label", pa.float32())])

# pass 2: normalize, pad jagged branches to their longest list with NaN, write
writing = 0.0
with pq.ParquetWriter(out, schema, compression="snappy") as writer:
    for arrays in tree.iterate(names, step_size=step, library="ak"):
        features, mask = [], []
        for name in flat_names:
            values = ak.to_numpy(arrays[name]).astype(np.float64)
            features.append(scaled(values, name)[:, None])
            mask.append(np.zeros((len(values), 1), np.uint8))
        for name in jagged_names:
            padded = ak.pad_none(arrays[name], jdim[name], axis=1, clip=True)
            missing = ak.to_numpy(ak.is_none(padded, axis=1)).astype(np.uint8)
            values = ak.to_numpy(ak.fill_none(padded, np.nan, axis=1)).astype(np.float64)
            features.append(scaled(values, name))
            mask.append(missing)
        features = np.concatenate(features, axis=1).astype(np.float32)
        mask = np.concatenate(mask, axis=1)
        n = len(features)
        table = pa.table({
            "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), width),
            "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), width),
            "label": pa.array(np.ones(n, np.float32)),
        })
        started = time.perf_counter()
        writer.write_table(table)
        writing += time.perf_counter() - started
print(f"writing {writing:.3f}")
'''


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds of ``command`` (a fresh process), the CPU seconds of its process tree
    (without Ray's workers, which are not its children) and its stdout; fails loudly."""
    started, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, children_cpu() - cpu, done.stdout


# --- read-only limit -----------------------------------------------------------------------


#: Trees each reading process opened, by path.
_TREES: dict[str, Any] = {}


def leaf_names(tree: Any) -> list[str]:
    return [name for name in tree.iterkeys() if not tree[name].branches]


def _read_range(path: str, start: int, stop: int) -> int:
    import uproot

    if path not in _TREES:
        _TREES[path] = uproot.open(path)["Events"]
    tree = _TREES[path]
    tree.arrays(leaf_names(tree), entry_start=start, entry_stop=stop, library="ak")
    return stop - start


def read_only_seconds(path: Path, events: int, basket: int, cores: int) -> float:
    """Seconds for ``cores`` processes to read every branch of every entry (whole baskets
    per call, file opened once per process): uproot's decompression and interpretation."""
    ranges = [(str(path), s, min(s + basket, events)) for s in range(0, events, basket)]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(cores, mp_context=context) as pool:
        list(pool.map(_read_range, [str(path)] * cores, [0] * cores, [1] * cores))  # open
        started = time.perf_counter()
        total = sum(pool.map(_read_range, *zip(*ranges, strict=True)))
        seconds = time.perf_counter() - started
    assert total == events
    return seconds


# --- outputs -------------------------------------------------------------------------------


def read_output(folder: Path) -> pa.Table:
    """The Parquet events of a ``flatten`` output folder (part files in name order)."""
    files = sorted((folder / "events").glob("*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def same_output(table: pa.Table, reference: pa.Table) -> bool:
    """Same rows, values (NaN where NaN), mask and label."""
    if table.num_rows != reference.num_rows or table.schema.names[:3] != reference.schema.names:
        return False
    for name in ("features", "mask"):
        a = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        b = reference.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if not np.array_equal(a, b, equal_nan=name == "features"):
            return False
    return table.column("label").to_pylist() == reference.column("label").to_pylist()


# --- driver --------------------------------------------------------------------------------


def load() -> list[float]:
    return [round(x, 1) for x in os.getloadavg()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--basket", type=int, default=10_000, help="events per basket")
    parser.add_argument("--out", type=Path, default=RESULTS / "flatten_command.json")
    parser.add_argument("--workdir", type=Path, help="keep the wide file here (default: temp)")
    parser.add_argument("--skip-ray-cold", action="store_true", help="no cold --execution ray")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mlaas4hep-flatten-"))
    work.mkdir(parents=True, exist_ok=True)
    # A platform home of its own: no head of the machine's platform is found or touched.
    env = {**os.environ, "MLAAS4HEP_HOME": str(work / "home")}
    env["RAY_AUTH_TOKEN_PATH"] = str(work / "ray_token")
    env.pop("RAY_ADDRESS", None)
    os.environ.update({k: env[k] for k in ("MLAAS4HEP_HOME", "RAY_AUTH_TOKEN_PATH")})
    from mlaas4hep.data.execution import usable_cores
    from mlaas4hep.platform.cluster import free_port, ray_env, start_head, stop_head
    from mlaas4hep.settings import load_settings

    cores = usable_cores()
    ports = {"port": free_port(), "ray_port": free_port(), "dashboard_port": free_port()}
    env.update({f"MLAAS4HEP_{k.upper()}": str(v) for k, v in ports.items()})
    settings = load_settings(**ports, num_cpus=cores)
    results: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    rows: list[dict] = []
    try:
        wide = work / f"wide-{args.events}-{args.basket}.root"
        if not wide.is_file():
            print(f"writing {wide.name} ...", flush=True)
            replicate(NANOAOD, "Events", wide, args.events, args.basket)
        spec = work / "spec.json"
        spec.write_text(json.dumps({"files": [str(wide)], "labels": [1]}))
        results["file"] = {"events": args.events, "bytes": wide.stat().st_size}

        def row(name: str, seconds: float, **extra) -> None:
            rate = round(args.events / seconds)
            rows.append(
                {"run": name, "seconds": round(seconds, 2), "events_per_s": rate,
                 "load_after": load(), **extra}
            )  # fmt: skip
            print(f"  {name:<46} {seconds:7.2f} s   (load {load()[0]})", flush=True)

        script = work / "script.py"
        script.write_text(SCRIPT)
        script_out = work / "script.parquet"
        seconds, cpu, printed = run_timed(
            [sys.executable, str(script), str(wide), str(script_out), str(args.basket)], env
        )
        row(
            "script (1 process)", seconds, cpu_s=round(cpu, 1), writing_s=float(printed.split()[-1])
        )
        reference = pq.read_table(script_out)

        def command(name: str, out: Path, *extra: str) -> None:
            shutil.rmtree(out, ignore_errors=True)
            cli = [str(MLAAS4HEP), "flatten", str(spec), "--out", str(out), *extra]
            seconds, cpu, printed = run_timed(cli, env)
            execution = next(line for line in printed.splitlines() if line.startswith("execution"))
            same = same_output(read_output(out), reference)
            # Ray's workers are not the command's children: their CPU is not counted.
            cpu_s = round(cpu, 1) if execution.startswith("execution: local") else None
            row(name, seconds, cpu_s=cpu_s, execution=execution, same_output_as_script=same)

        command("command, cold", work / "cold")
        if not args.skip_ray_cold:
            command("command, cold, --execution ray", work / "cold-ray", "--execution", "ray")
        os.environ.update({k: v for k, v in ray_env().items() if k not in os.environ})
        start_head(settings, timeout=600)
        command("command, running head", work / "head")
        command(
            "command, running head, --execution ray (1st)", work / "head-1", "--execution", "ray"
        )
        command(
            "command, running head, --execution ray (2nd)", work / "head-2", "--execution", "ray"
        )
        stop_head(settings, keep_logs=False)
        seconds = read_only_seconds(wide, args.events, args.basket, cores)
        row(f"read-only limit ({cores} processes)", seconds)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        stop_head(settings, keep_logs=False)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    script_s = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_script"] = round(script_s / r["seconds"], 2)
    results["rows"] = rows
    results["machine"]["load_average_at_end"] = load()
    print()
    header = (
        f"{'run':<46} {'s':>7} {'events/s':>10} {'vs script':>9} {'CPU s':>6}  same output  load"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        same = {True: "yes", False: "NO", None: ""}[r.get("same_output_as_script")]
        cpu = "" if r.get("cpu_s") is None else f"{r['cpu_s']:.1f}"
        print(
            f"{r['run']:<46} {r['seconds']:>7.2f} {r['events_per_s']:>10,} "
            f"{r['speedup_vs_script']:>8.2f}x {cpu:>6}  {same:<11}  {r['load_after'][0]}"
        )
    print(f"\nscript: {rows[0]['writing_s']:.2f} s of its time writing Parquet")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r.get("same_output_as_script", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
