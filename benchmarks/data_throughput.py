"""Data-layer throughput: specs pass, flatten, read+specs+flatten; Ray Data vs one process.

Run from the repository root (one command; several minutes on 2 cores)::

    .venv/bin/python benchmarks/data_throughput.py [--wide-events 200000] [--narrow-events 1000000]

It writes, into a temporary folder,

* a *wide* file: every numeric branch of ``../shared/data/nanoAOD_2015_CMS_Open_Data_ttbar.root``
  (603 flat + 344 jagged), its 200 events replicated to ``--wide-events``, in baskets of
  ``--basket`` events;
* a *narrow* file: the H->ZZ branches of ``uproot-HZZ.root`` replicated the same way;

serves both from a loopback ``xrootd``, and measures (fastest of ``--repeat`` runs, default
2) events/s, events/s per core (one process: events per CPU-second of that process; Ray
Data: events/s over the cores) and MB/s (uncompressed bytes of the branches read) of

* (a) the specs pass (read + per-block specs + merge),
* (b) flatten alone (events already in memory),
* (c) read + specs + flatten, as a pipeline does: the platform reads the events once into
  the object store when they fit (``cache_events: auto``), and the row "c ... read twice"
  streams them from the file in both passes (``cache_events: never``); the baseline reads
  the file twice,

for the platform on Ray Data (a local Ray using every core) and a single-process baseline
(``uproot.iterate`` plus the same ``block_specs`` / ``flatten_columns`` functions, in steps
of whole baskets as big as the platform's read tasks), local and over ``root://``; and
the driver's peak RSS during (c) for two numbers of events. It prints a table and writes
JSON to ``benchmarks/results/data_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from functools import reduce
from pathlib import Path
from typing import NamedTuple

import awkward as ak
import psutil
import uproot

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
CORES = os.cpu_count() or 1


def replicate(source: Path, tree: str, target: Path, events: int, basket: int) -> list[str]:
    """Write ``events`` events of ``source``'s numeric branches (replicated) to ``target``."""
    from mlaas4hep.data.rootio import tree_branches

    inp = uproot.open(source)[tree]
    names = [b.name for b in tree_branches(inp) if b.kind != "unsupported"]
    arrays = inp.arrays(names, library="ak")
    copies = -(-basket // len(arrays))
    block = ak.concatenate([arrays] * copies)[:basket]
    with uproot.recreate(target) as out:
        out.mktree("Events", {n: block[n].type.content for n in names})
        written = 0
        while written < events:
            n = min(basket, events - written)
            out["Events"].extend({name: block[name][:n] for name in names})
            written += n
    return names


def spec_for(path: str, **extra):
    from mlaas4hep.spec import parse_spec

    return parse_spec({"files": [{"path": path, "label": 1}], **extra})


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> PeakRSS:
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


class Timing(NamedTuple):
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time (all of a 1-process run's work)


#: Runs of each measurement; the fastest counts (``--repeat``).
REPEAT = 2


def timed(function: Callable[[], object]) -> Timing:
    """The fastest of :data:`REPEAT` runs of ``function``."""
    timings = []
    for _ in range(REPEAT):
        start, cpu = time.perf_counter(), time.process_time()
        function()
        timings.append(Timing(time.perf_counter() - start, time.process_time() - cpu))
    return min(timings)


# --- platform on Ray Data ----------------------------------------------------------------


def platform_specs(spec, summary):
    from mlaas4hep.data.datasource import read_events
    from mlaas4hep.data.features import compute_specs

    return compute_specs(read_events(spec, summary, pipeline="benchmark"), spec)


def platform_full(spec, summary) -> int:
    """Read, specs pass, flatten every event, as a pipeline does; the driver counts rows.

    With ``spec.cache_events`` (default ``auto``) the events are read once when they fit
    a quarter of the object store; ``never`` reads the files in both passes.
    """
    from mlaas4hep.data.datasource import read_events_once
    from mlaas4hep.data.features import compute_specs
    from mlaas4hep.data.flatten import flatten_dataset

    events = read_events_once(spec, summary, pipeline="benchmark")
    flat = flatten_dataset(events, compute_specs(events, spec), spec)
    rows = 0
    for bundle in flat.iter_internal_ref_bundles():
        rows += bundle.num_rows()
    return rows


def platform_flatten_only(spec, summary, specs) -> Timing:
    """Seconds to flatten events already materialized in the object store."""
    import ray

    from mlaas4hep.data.datasource import read_events
    from mlaas4hep.data.flatten import flatten_dataset

    cached = read_events(spec, summary).materialize()

    def flatten_all() -> None:
        flat = flatten_dataset(cached, specs, spec)
        for bundle in flat.iter_internal_ref_bundles():  # each output dropped once done
            ray.wait(bundle.block_refs, num_returns=len(bundle.block_refs))

    return timed(flatten_all)


# --- single-process baseline -------------------------------------------------------------


def baseline_iterate(path: str, names: list[str], step: int):
    from mlaas4hep.data.rootio import open_options

    source = {path: "Events"}
    options = {k: v for k, v in open_options(path).items() if k != "array_cache"}  # iterate's own
    return uproot.iterate(source, names, step_size=step, library="ak", **options)


def baseline_specs(path: str, names: list[str], step: int):
    from mlaas4hep.data.features import block_specs, merge_specs

    parts = [
        block_specs({n: chunk[n] for n in names}) for chunk in baseline_iterate(path, names, step)
    ]
    return reduce(merge_specs, parts).finalize()


def baseline_full(path: str, names: list[str], step: int) -> int:
    from mlaas4hep.data.flatten import flatten_columns

    specs = baseline_specs(path, names, step)
    rows = 0
    for chunk in baseline_iterate(path, names, step):
        rows += len(flatten_columns({n: chunk[n] for n in names}, specs)[0])
    return rows


def baseline_flatten_only(path: str, names: list[str], step: int, specs) -> Timing:
    from mlaas4hep.data.flatten import flatten_columns

    chunks = [{n: chunk[n] for n in names} for chunk in baseline_iterate(path, names, step)]
    flatten_columns(chunks[0], specs)  # loads the compiled kernel, once per process

    def flatten_all() -> None:  # each result dropped, as a pipeline hands it on
        for chunk in chunks:
            flatten_columns(chunk, specs)

    return timed(flatten_all)


# --- driver --------------------------------------------------------------------------------


def baseline_step(summary, basket: int) -> int:
    """The baseline's events per ``uproot.iterate`` step: what a platform read task gets
    without ``chunk_size`` (about ``TASK_BYTES``), in whole baskets."""
    from mlaas4hep.data.datasource import TASK_BYTES

    events = int(TASK_BYTES / summary.files[0].bytes_per_entry)
    return max(basket, events // basket * basket)


def measure(
    label: str, path: str, events: int, chunk_size: int | None, basket: int, flatten_only: bool
) -> list[dict]:
    from mlaas4hep.data.rootio import inspect_inputs

    spec = spec_for(path, chunk_size=chunk_size)
    summary = inspect_inputs(spec)
    step = chunk_size or baseline_step(summary, basket)
    names = [b.name for b in summary.features]
    mb = summary.files[0].bytes_per_entry * events / 1e6
    specs = platform_specs(spec, summary)
    rows: list[dict] = []

    def row(stage: str, runner: str, timing: Timing) -> None:
        seconds = timing.seconds
        # per core: one process's events per CPU-second; Ray Data's events/s over the cores
        per_core = events / (timing.cpu_seconds if runner == "1-process" else seconds * CORES)
        rows.append(
            {
                "file": label,
                "stage": stage,
                "runner": runner,
                "events": events,
                "features": specs.n_features,
                "seconds": round(seconds, 3),
                "events_per_s": round(events / seconds),
                "events_per_core_s": round(per_core),
                "mb_per_s": round(mb / seconds, 1),
            }
        )
        print(f"  {label:<14} {stage:<22} {runner:<12} {seconds:8.2f} s", flush=True)

    row("a specs pass", "ray-data", timed(lambda: platform_specs(spec, summary)))
    row("a specs pass", "1-process", timed(lambda: baseline_specs(path, names, step)))
    if flatten_only:
        row("b flatten alone", "ray-data", platform_flatten_only(spec, summary, specs))
        row("b flatten alone", "1-process", baseline_flatten_only(path, names, step, specs))
    row("c read+specs+flatten", "ray-data", timed(lambda: platform_full(spec, summary)))
    streamed = spec.model_copy(update={"cache_events": "never"})
    row("c ... read twice", "ray-data", timed(lambda: platform_full(streamed, summary)))
    row("c read+specs+flatten", "1-process", timed(lambda: baseline_full(path, names, step)))
    return rows


def driver_memory(path: str, total: int, address: str) -> list[dict]:
    """Peak RSS of a driver running (c) for a quarter of the events and for all of them.

    Each size runs in a fresh driver process (:func:`memory_probe`): this process has held
    whole files for the baseline, and freed memory stays in its resident set.
    """
    rows = []
    for nevts in (total // 4, total):
        probe = [sys.executable, __file__, "--memory-probe", path, str(nevts), address]
        out = subprocess.run(probe, check=True, capture_output=True, text=True).stdout
        peak = int(out.split()[-1])
        rows.append({"events": nevts, "peak_rss_mb": round(peak / 2**20)})
        print(f"  driver peak RSS with {nevts} events: {peak / 2**20:.0f} MiB", flush=True)
    return rows


def memory_probe(path: str, nevts: int, address: str) -> None:
    """Run (c) on ``nevts`` events of ``path`` as a driver of ``address``; print peak RSS."""
    import ray

    from mlaas4hep.data.rootio import inspect_inputs

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    spec = spec_for(path, nevts=nevts)
    with PeakRSS() as peak:
        platform_full(spec, inspect_inputs(spec))
    ray.shutdown()
    print(peak.peak)


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'file':<14} {'stage':<22} {'runner':<10} {'events/s':>10} {'per core':>10} "
        f"{'MB/s':>8} {'s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['file']:<14} {r['stage']:<22} {r['runner']:<10} {r['events_per_s']:>10,} "
            f"{r['events_per_core_s']:>10,} {r['mb_per_s']:>8.1f} {r['seconds']:>8.2f}"
        )


def main() -> int:
    global REPEAT
    if sys.argv[1:2] == ["--memory-probe"]:
        memory_probe(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wide-events", type=int, default=200_000)
    parser.add_argument("--narrow-events", type=int, default=1_000_000)
    parser.add_argument("--basket", type=int, default=10_000, help="events per basket")
    parser.add_argument(
        "--chunk-size", type=int, help="events per read task (default: the platform's, by bytes)"
    )
    parser.add_argument("--no-xrootd", action="store_true", help="skip the root:// runs")
    parser.add_argument("--repeat", type=int, default=REPEAT, help="runs a row; fastest counts")
    parser.add_argument("--out", type=Path, default=RESULTS / "data_throughput.json")
    parser.add_argument(
        "--workdir", type=Path, help="keep the written files here and reuse them (default: temp)"
    )
    args = parser.parse_args()
    REPEAT = max(1, args.repeat)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mlaas4hep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # A head of its own, in the work folder, with token authentication as the platform runs.
    os.environ["MLAAS4HEP_HOME"] = str(work / "home")
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(work / "ray_token")
    from mlaas4hep.platform.cluster import (
        ClusterError,
        free_port,
        ray_env,
        start_head,
        stop_head,
    )
    from mlaas4hep.settings import load_settings

    os.environ.update({k: v for k, v in ray_env().items() if k not in os.environ})
    import ray
    import ray.data

    def fresh_settings():  # ports picked just before the head starts: others take free ones
        ports = {"port": free_port(), "ray_port": free_port(), "dashboard_port": free_port()}
        return load_settings(**ports, num_cpus=os.cpu_count())

    settings = fresh_settings()

    from mlaas4hep.platform.xrootd_server import XRootDNotInstalled, run_xrootd

    results: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        print("writing files ...", flush=True)
        wide = work / f"wide-{args.wide_events}-{args.basket}.root"
        narrow = work / f"narrow-{args.narrow_events}-{args.basket}.root"
        started = time.perf_counter()
        if not wide.is_file():
            nanoaod = DATA / "nanoAOD_2015_CMS_Open_Data_ttbar.root"
            replicate(nanoaod, "Events", wide, args.wide_events, args.basket)
        if not narrow.is_file():
            replicate(DATA / "uproot-HZZ.root", "events", narrow, args.narrow_events, args.basket)
        sizes = (
            f"wide {wide.stat().st_size / 1e6:.0f} MB, narrow {narrow.stat().st_size / 1e6:.0f} MB"
        )
        print(f"  wrote in {time.perf_counter() - started:.0f} s: {sizes}", flush=True)
        results["files"] = {
            "wide": {"events": args.wide_events, "bytes": wide.stat().st_size},
            "narrow": {"events": args.narrow_events, "bytes": narrow.stat().st_size},
        }
        for attempt in range(1, 4):  # Ray gives its node 30 s to start; a loaded machine misses it
            try:
                settings = fresh_settings()
                head = start_head(settings, timeout=600)
                break
            except ClusterError as error:
                if attempt == 3:
                    raise
                print(f"  Ray did not start ({str(error).splitlines()[-1]}); retrying", flush=True)
        ray.init(address=head.gcs_address, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        import logging

        logging.getLogger("ray.data").setLevel(logging.WARNING)
        chunk, basket = args.chunk_size, args.basket
        rows = []
        rows += measure("wide local", str(wide), args.wide_events, chunk, basket, True)
        rows += measure("narrow local", str(narrow), args.narrow_events, chunk, basket, True)
        if not args.no_xrootd:
            try:
                with run_xrootd() as server:
                    for label, path, events in (
                        ("wide root://", server.add(wide), args.wide_events),
                        ("narrow root://", server.add(narrow), args.narrow_events),
                    ):
                        rows += measure(label, path, events, chunk, basket, False)
            except XRootDNotInstalled as error:
                print(f"  skipping root:// runs: {error}")
        results["rows"] = rows
        results["machine"]["load_average_after_rows"] = [round(x, 1) for x in os.getloadavg()]
        results["driver_memory"] = driver_memory(str(wide), args.wide_events, head.gcs_address)
    except BaseException:
        traceback.print_exc()  # before the clean-up, which may not return on a broken head
        raise
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stop_head(settings, keep_logs=False)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print_table(results["rows"])
    print()
    for r in results["driver_memory"]:
        print(f"driver peak RSS, wide file, {r['events']:>8} events: {r['peak_rss_mb']} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
