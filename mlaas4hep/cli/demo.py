"""Demo data: a small signal and background pair of NanoAOD-like ROOT files.

The two samples differ in their jet and muon multiplicities, jet momenta, b-tagging
and missing transverse momentum, so a model trained on them separates them clearly
but not perfectly (AUC around 0.9). Both files are written as TTrees (``mktree`` and
``extend``), in several baskets so that readers see more than one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

#: Name of the TTree in the demo files.
DEMO_TREE = "Events"

#: Entries per basket (one ``extend`` call each).
_BASKET = 1000


@dataclass(frozen=True)
class _Sample:
    """Knobs of one physics process."""

    mean_jets: float
    jet_pt_scale: float
    btag_a: float
    mean_muons: float
    muon_pt_scale: float
    met_scale: float
    eta_width: float


_SIGNAL = _Sample(4.0, 55.0, 2.0, 1.3, 35.0, 45.0, 1.4)
_BACKGROUND = _Sample(2.6, 38.0, 1.0, 0.8, 25.0, 28.0, 1.9)


def _jagged(counts: np.ndarray, values: np.ndarray) -> ak.Array:
    return ak.unflatten(values, counts)


def _sample_events(sample: _Sample, events: int, rng: np.random.Generator, first_event: int):
    """Return a dict of branch name -> numpy or awkward array for ``events`` events."""
    n_jet = np.minimum(rng.poisson(sample.mean_jets, events), 12).astype(np.int32)
    n_mu = np.minimum(rng.poisson(sample.mean_muons, events), 5).astype(np.int32)
    total_jets, total_mu = int(n_jet.sum()), int(n_mu.sum())

    jet_pt = (20.0 + rng.exponential(sample.jet_pt_scale, total_jets)).astype(np.float32)
    jets = ak.zip(
        {
            "pt": _jagged(n_jet, jet_pt),
            "eta": _jagged(n_jet, rng.normal(0.0, sample.eta_width, total_jets).astype(np.float32)),
            "phi": _jagged(n_jet, rng.uniform(-np.pi, np.pi, total_jets).astype(np.float32)),
            "btag": _jagged(n_jet, rng.beta(sample.btag_a, 3.0, total_jets).astype(np.float32)),
        }
    )
    muons = ak.zip(
        {
            "pt": _jagged(
                n_mu, (5.0 + rng.exponential(sample.muon_pt_scale, total_mu)).astype("f4")
            ),
            "eta": _jagged(n_mu, rng.normal(0.0, 1.2, total_mu).astype(np.float32)),
            "phi": _jagged(n_mu, rng.uniform(-np.pi, np.pi, total_mu).astype(np.float32)),
        }
    )
    met = rng.exponential(sample.met_scale, events).astype(np.float32)
    return {
        "run": np.full(events, 1, dtype=np.uint32),
        "luminosityBlock": (1 + np.arange(events) // 500).astype(np.uint32),
        "event": (first_event + np.arange(events)).astype(np.uint64),
        "MET_pt": met,
        "MET_phi": rng.uniform(-np.pi, np.pi, events).astype(np.float32),
        "HT": ak.to_numpy(ak.sum(jets.pt, axis=1)).astype(np.float32),
        "Jet": jets,
        "Muon": muons,
    }


def _branch_types() -> dict[str, object]:
    jet = {"pt": "float32", "eta": "float32", "phi": "float32", "btag": "float32"}
    muon = {"pt": "float32", "eta": "float32", "phi": "float32"}
    return {
        "run": np.uint32,
        "luminosityBlock": np.uint32,
        "event": np.uint64,
        "MET_pt": np.float32,
        "MET_phi": np.float32,
        "HT": np.float32,
        # A record of lists becomes Jet_pt, Jet_eta, ... sharing one counter branch, nJet.
        "Jet": ak.types.from_datashape("var * {" + _fields(jet) + "}", highlevel=False),
        "Muon": ak.types.from_datashape("var * {" + _fields(muon) + "}", highlevel=False),
    }


def _fields(fields: dict[str, str]) -> str:
    return ", ".join(f"{name}: {dtype}" for name, dtype in fields.items())


def _write(path: Path, sample: _Sample, events: int, rng: np.random.Generator, first: int) -> None:
    with uproot.recreate(path) as file:
        tree = file.mktree(
            DEMO_TREE,
            _branch_types(),
            counter_name=lambda name: f"n{name}",
            field_name=lambda outer, inner: f"{outer}_{inner}",
        )
        for start in range(0, events, _BASKET):
            size = min(_BASKET, events - start)
            tree.extend(_sample_events(sample, size, rng, first + start))


def write_demo_data(out_dir: str | Path, events: int = 4000, seed: int = 42) -> tuple[Path, Path]:
    """Write ``signal.root`` and ``background.root`` (TTree ``Events``) into ``out_dir``.

    Each file holds ``events`` events; the same ``seed`` writes the same data.
    Returns the paths of the signal and the background file.
    """
    if events < 1:
        raise ValueError(f"events must be at least 1, got {events}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    signal, background = out / "signal.root", out / "background.root"
    rng = np.random.default_rng(seed)
    _write(signal, _SIGNAL, events, rng, first=1)
    _write(background, _BACKGROUND, events, rng, first=1 + events)
    return signal, background
