"""Zero-knowledge proofs of shard execution with ezkl (KZG/Halo2 on BN254).

For a provable model (the digits MLP), each shard (a contiguous layer range) becomes one
circuit with Poseidon-hashed input and output and the weights fixed in the circuit, so
the verifying key binds the weights and a proof exposes only ``[H(input), H(output)]``.
Consecutive shards chain: shard *i*'s output hash is shard *i+1*'s input hash. Settings
come from the measured prototype (``docs/zk-prototype.md``): scale 13, range-check
decomposition 256 x 3 legs, logrows 12.

Artifacts (ONNX, settings, compiled circuit, vk, pk, SRS) are built on demand and cached
under ``<cache>/zk/`` by content: a circuit directory is named by the model id, the range
and the hash of the configuration; an SRS file by its logrows, and every consumer checks
its SHA-256 against the pin in the ZK manifest. ``ezkl.gen_srs`` (used when no SRS file
is supplied) draws a random secret: **fine for tests, unsafe in production**, where the
SRS must come from a public ceremony (``docs/zk.md``).

ezkl holds the GIL for whole calls, so callers run :func:`prove` in a separate process.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import NotProvable, ZkError
from ..files import write_atomically

ZK_SCALE = 13
DECOMP_BASE = 256
DECOMP_LEGS = 3
CONFIG = {"scale": ZK_SCALE, "decomp_base": DECOMP_BASE, "decomp_legs": DECOMP_LEGS, "input": "hashed",
          "output": "hashed", "params": "fixed", "opset": 18, "format": 1}
P_BN254 = 21888242871839275222246405745257275088548364400416034343698204186575808495617


def _ezkl() -> Any:
    os.environ.setdefault("EZKL_REPO_PATH", str(Path(os.environ.get("P2P_INFER_CACHE", Path.home() / ".cache" / "p2p-infer")) / "ezkl"))
    import ezkl

    return ezkl


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config_hash() -> str:
    return hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CircuitPin:
    """What a verifier must trust for one shard: hashes of its settings and verifying key."""

    first: int
    last: int
    settings_sha256: str
    vk_sha256: str
    logrows: int


@dataclass(frozen=True)
class ZkManifest:
    """The ZK pins of a model: one SRS per circuit size (logrows), and per provable shard its
    settings and vk hashes. Shards of one model may need different sizes (digits 1-1 fits
    2^12 rows, a wider range may not), so one SRS per model would make them clash."""

    model_id: str
    srs_sha256: dict[int, str]  # logrows -> SHA-256 of kzg<logrows>.srs
    shards: tuple[CircuitPin, ...]

    def pin(self, first: int, last: int) -> CircuitPin:
        for p in self.shards:
            if (p.first, p.last) == (first, last):
                return p
        raise NotProvable(f"layers {first}-{last} of {self.model_id[:12]} have no circuit")

    def srs_for(self, pin: CircuitPin) -> str:
        if pin.logrows not in self.srs_sha256:
            raise ZkError(f"ZK manifest of {self.model_id[:12]} pins no SRS of logrows {pin.logrows}")
        return self.srs_sha256[pin.logrows]

    def to_json(self) -> str:
        srs = {str(k): v for k, v in sorted(self.srs_sha256.items())}
        return json.dumps({"model_id": self.model_id, "srs_sha256": srs, "config": CONFIG, "format": 2,
                           "shards": [asdict(p) for p in self.shards]}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ZkManifest:
        data = json.loads(text)
        shards = tuple(CircuitPin(**p) for p in data["shards"])
        srs = data["srs_sha256"]
        if isinstance(srs, str):  # format 1: one SRS, shared by every pinned shard's size
            srs = {p.logrows: srs for p in shards}
        return cls(data["model_id"], {int(k): v for k, v in srs.items()}, shards)


@dataclass(frozen=True)
class Circuit:
    """A built shard circuit on disk."""

    directory: Path
    first: int
    last: int
    logrows: int
    srs: Path

    @property
    def settings(self) -> Path:
        return self.directory / "settings.json"

    @property
    def compiled(self) -> Path:
        return self.directory / "model.ezkl"

    @property
    def vk(self) -> Path:
        return self.directory / "vk.key"

    @property
    def pk(self) -> Path:
        return self.directory / "pk.key"

    def pin(self) -> CircuitPin:
        return CircuitPin(self.first, self.last, sha256_file(self.settings), sha256_file(self.vk), self.logrows)


def zk_dir(cache_dir: Path) -> Path:
    return cache_dir / "zk"


def srs_path(cache_dir: Path, logrows: int) -> Path:
    return zk_dir(cache_dir) / "srs" / f"kzg{logrows}.srs"


def ensure_srs(cache_dir: Path, logrows: int, supplied: Path | None = None) -> Path:
    """The SRS for ``logrows``: a supplied ceremony file (copied into the cache), else a
    cached one, else a fresh TEST-ONLY ``gen_srs`` (random secret)."""
    path = srs_path(cache_dir, logrows)
    if path.exists():
        return path
    ceremony_dir = os.environ.get("P2P_INFER_SRS_DIR")  # public ceremony files, named kzg<k>.srs
    if supplied is None and ceremony_dir and (Path(ceremony_dir) / f"kzg{logrows}.srs").exists():
        supplied = Path(ceremony_dir) / f"kzg{logrows}.srs"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    if supplied is not None:
        tmp.write_bytes(supplied.read_bytes())
    else:
        _ezkl().gen_srs(str(tmp), logrows)
    if not path.exists():
        os.replace(tmp, path)  # first writer wins; everyone then uses the same file
    else:
        tmp.unlink(missing_ok=True)
    return path


def build_circuit(model: Any, first: int, last: int, cache_dir: Path, calibration: Any, srs_file: Path | None = None) -> Circuit:
    """Export layers ``first..last`` of ``model`` and set up their circuit (cached).

    ``calibration`` is a float tensor [N, hidden] of typical inputs to the shard (ezkl picks
    its lookup ranges from it; the range check must cover the largest activation).
    """
    import torch

    ezkl = _ezkl()
    directory = zk_dir(cache_dir) / "circuits" / f"{model.model_id[:16]}-{first}-{last}-{config_hash()}"
    done = directory / "done.json"
    if done.exists():
        meta = json.loads(done.read_text())
        return Circuit(directory, first, last, meta["logrows"], Path(meta["srs"]))
    directory.mkdir(parents=True, exist_ok=True)
    shard = torch.nn.Sequential(*model.layers[first : last + 1]).eval()
    onnx_path = directory / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(shard, (torch.zeros(1, model.manifest.hidden_size),), str(onnx_path), input_names=["input"],
                          output_names=["output"], opset_version=18, dynamo=False)
    args = ezkl.PyRunArgs()
    args.input_visibility, args.output_visibility, args.param_visibility = "hashed", "hashed", "fixed"
    args.input_scale = args.param_scale = ZK_SCALE
    args.decomp_base, args.decomp_legs = DECOMP_BASE, DECOMP_LEGS
    peak = float(calibration.abs().max())
    if DECOMP_BASE**DECOMP_LEGS <= 1.5 * peak * 2**ZK_SCALE:
        raise ZkError(f"activations up to {peak:.1f} overflow the circuit's range check")
    cal_path = directory / "calibration.json"
    order = calibration.abs().max(1).values.argsort(descending=True)
    chosen = calibration[torch.cat([order[:32], order[-32:]])]
    cal_path.write_text(json.dumps({"input_data": [chosen.reshape(-1).tolist()]}))
    c = Circuit(directory, first, last, 0, Path())
    ezkl.gen_settings(str(onnx_path), str(c.settings), py_run_args=args)
    ezkl.calibrate_settings(str(cal_path), str(onnx_path), str(c.settings), "resources", scales=[ZK_SCALE], scale_rebase_multiplier=[1])
    settings = json.loads(c.settings.read_text())
    if settings["model_output_scales"] != [ZK_SCALE] or settings["model_input_scales"] != [ZK_SCALE]:
        raise ZkError(f"calibration changed the shard's scales: {settings['model_input_scales']} -> {settings['model_output_scales']}")
    ezkl.compile_circuit(str(onnx_path), str(c.compiled), str(c.settings))
    logrows = int(settings["run_args"]["logrows"])
    srs = ensure_srs(cache_dir, logrows, srs_file)
    ezkl.setup(str(c.compiled), str(c.vk), str(c.pk), str(srs))
    done.write_text(json.dumps({"logrows": logrows, "srs": str(srs)}))
    return Circuit(directory, first, last, logrows, srs)


# ---- values: floats <-> field elements, and the Poseidon hash the circuits expose ----


def felt_to_float(felt_hex: str) -> float:
    v = int.from_bytes(bytes.fromhex(felt_hex), "little")
    return (v - P_BN254 if v > P_BN254 // 2 else v) / 2**ZK_SCALE


def hash_values(values: list[float]) -> str:
    """Poseidon hash of the values as the circuit sees them (quantised at ZK_SCALE)."""
    ezkl = _ezkl()
    return str(ezkl.poseidon_hash([ezkl.float_to_felt(float(v), ZK_SCALE, ezkl.PyInputType.F32) for v in values])[0])


# ---- proving and verifying ----


@dataclass(frozen=True)
class ShardProof:
    first: int
    last: int
    proof: bytes
    instances: tuple[str, str]  # (H(input), H(output)) as little-endian hex field elements

    def to_wire(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "proof": self.proof, "instances": list(self.instances)}

    @classmethod
    def from_wire(cls, raw: Any) -> ShardProof:
        ok = isinstance(raw, dict) and isinstance(raw.get("proof"), bytes) and isinstance(raw.get("instances"), list)
        ok = ok and len(raw["instances"]) == 2 and all(isinstance(i, str) and len(i) == 64 for i in raw["instances"])
        ok = ok and isinstance(raw.get("first"), int) and isinstance(raw.get("last"), int)
        if not ok:
            raise ZkError("proof must be {first, last, proof: bytes, instances: [2 x 64 hex]}")
        return cls(raw["first"], raw["last"], raw["proof"], (raw["instances"][0], raw["instances"][1]))


def circuit_forward(circuit: Circuit, values: list[float], workdir: Path) -> list[float]:
    """The shard's output as its circuit computes it (gen_witness, no proof), in-process."""
    return circuit_witness(str(circuit.directory), values, str(workdir))["outputs"]


def circuit_witness(circuit_dir: str, values: list[float], workdir: str) -> dict[str, Any]:
    """The shard's forward pass as its circuit computes it; keeps the witness for proving.
    Runs in a worker process."""
    import time

    ezkl = _ezkl()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    data, witness = work / "input.json", work / "witness.json"
    data.write_text(json.dumps({"input_data": [values]}))
    start = time.perf_counter()
    w = ezkl.gen_witness(str(data), str(Path(circuit_dir) / "model.ezkl"), str(witness))
    return {"outputs": [felt_to_float(f) for f in w["outputs"][0]], "witness": str(witness),
            "witness_ms": (time.perf_counter() - start) * 1000}


def prove_witness(circuit_dir: str, srs: str, witness: str) -> dict[str, Any]:
    """Prove a witness made by :func:`circuit_witness`. Runs in a worker process."""
    import time

    ezkl = _ezkl()
    directory = Path(circuit_dir)
    start = time.perf_counter()
    proof = ezkl.prove(witness, str(directory / "model.ezkl"), str(directory / "pk.key"), str(Path(witness).with_name("proof.json")), srs)
    return {"proof": _proof_bytes(proof["proof"]), "instances": list(proof["instances"][0]),
            "prove_ms": (time.perf_counter() - start) * 1000}


def run_and_prove(circuit_dir: str, logrows: int, srs: str, values: list[float], workdir: str) -> dict[str, Any]:
    """Witness and proof in one call (a worker process, or in-process in tests and benchmarks)."""
    del logrows  # the circuit directory's settings carry it
    witnessed = circuit_witness(circuit_dir, values, workdir)
    return {**witnessed, **prove_witness(circuit_dir, srs, witnessed["witness"])}


def _proof_bytes(raw: Any) -> bytes:
    if isinstance(raw, str):  # the returned dict holds hex; proof.json holds a byte list
        return bytes.fromhex(raw.removeprefix("0x"))
    return bytes(raw)


def verify_proof(proof: ShardProof, settings: Path, vk: Path, srs: Path, workdir: Path) -> None:
    """Raise ZkError unless ``proof`` verifies against this verifying key."""
    ezkl = _ezkl()
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"proof-{proof.first}-{proof.last}-{os.getpid()}.json"
    path.write_text(json.dumps({"instances": [list(proof.instances)], "proof": list(proof.proof)}))
    try:
        ok = ezkl.verify(str(path), str(settings), str(vk), str(srs))
    except Exception as exc:  # ezkl raises (never returns False) on a bad proof
        raise ZkError(f"proof for layers {proof.first}-{proof.last} does not verify: {exc}") from None
    finally:
        path.unlink(missing_ok=True)
    if ok is not True:
        raise ZkError(f"proof for layers {proof.first}-{proof.last} does not verify")


def check_chain(proofs: list[ShardProof], first_input_hash: str, final_output_hash: str) -> None:
    """The hashes line up: the client's input, shard to shard, and the output received."""
    if not proofs:
        raise ZkError("no proofs")
    if proofs[0].instances[0] != first_input_hash:
        raise ZkError("the first proof is not about the activation the client sent")
    for a, b in zip(proofs, proofs[1:]):
        if b.first != a.last + 1:
            raise ZkError(f"proofs do not cover contiguous layers ({a.first}-{a.last}, then {b.first}-{b.last})")
        if a.instances[1] != b.instances[0]:
            raise ZkError(f"output of layers {a.first}-{a.last} is not the input of layers {b.first}-{b.last}")
    if proofs[-1].instances[1] != final_output_hash:
        raise ZkError("the output received is not the output the last proof is about")


def circuits_for(model: Any, ranges: list[tuple[int, int]], cache_dir: Path, srs_file: Path | None = None) -> dict[tuple[int, int], Circuit]:
    """Build (or load from the cache) the circuits of ``model``'s shards, serialised by a
    lock file so processes sharing a cache never build the same circuit twice at once."""
    import fcntl

    if not model.provable:
        raise NotProvable(f"{model.name} is not provable (too large for ezkl on this hardware; see docs/zk-prototype.md)")
    lock_path = zk_dir(cache_dir) / "build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            built = {(f, l): build_circuit(model, f, l, cache_dir, model.shard_inputs(f), srs_file) for f, l in ranges}
            record_pins(cache_dir, model.model_id, built)
            return built
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_in_subprocess(model_name: str, ranges: list[tuple[int, int]], cache_dir: str) -> dict[tuple[int, int], Circuit]:
    """:func:`circuits_for` in a worker process (see :class:`CircuitBuilder`): loads the model
    itself, at a lower CPU priority so the serving process keeps its cores' attention."""
    from ..ml.models import load_model

    try:
        os.nice(10)
    except OSError:  # not permitted here: build at normal priority
        pass
    return circuits_for(load_model(model_name, Path(cache_dir)), ranges, Path(cache_dir))


class CircuitBuilder:
    """Circuit builds (ezkl compile and key setup: seconds to minutes of CPU, holding the GIL
    throughout) in a separate spawned process, so the peer's event loop never stalls."""

    def __init__(self) -> None:
        import concurrent.futures
        import multiprocessing

        self.executor = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    def build(self, model_name: str, ranges: list[tuple[int, int]], cache_dir: Path) -> dict[tuple[int, int], Circuit]:
        """Blocking: call from a worker thread."""
        return self.executor.submit(build_in_subprocess, model_name, ranges, str(cache_dir)).result()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# ---- pins and artifact exchange ----


def zk_manifest_path(cache_dir: Path, model_id: str) -> Path:
    return zk_dir(cache_dir) / "manifests" / f"{model_id}.json"


def load_zk_manifest(cache_dir: Path, model_id: str) -> ZkManifest | None:
    path = zk_manifest_path(cache_dir, model_id)
    return ZkManifest.from_json(path.read_text()) if path.exists() else None


def record_pins(cache_dir: Path, model_id: str, circuits: dict[tuple[int, int], Circuit]) -> ZkManifest:
    """Add these circuits' pins to the model's ZK manifest (one SRS per circuit size)."""
    known = load_zk_manifest(cache_dir, model_id)
    pins = {(p.first, p.last): p for p in (known.shards if known else ())}
    srs = dict(known.srs_sha256) if known else {}
    for c in circuits.values():
        sha = sha256_file(c.srs)
        if srs.setdefault(c.logrows, sha) != sha:
            raise ZkError(f"circuits of one model must share one SRS per size: logrows {c.logrows} is pinned "
                          f"to {srs[c.logrows][:12]}, layers {c.first}-{c.last} used {sha[:12]}")
        pins[(c.first, c.last)] = c.pin()
    manifest = ZkManifest(model_id, srs, tuple(sorted(pins.values(), key=lambda p: (p.first, p.last))))
    write_atomically(zk_manifest_path(cache_dir, model_id), manifest.to_json().encode())
    return manifest


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256


def _cached_sha256(path: Path) -> str:
    """Every artifact request for an unknown hash used to hash every artifact again (up to
    64 MiB each): one file's hash is kept until the file changes."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        if len(_HASHES) > 4096:
            _HASHES.clear()
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


class ArtifactStore:
    """What a peer may hand out by hash: settings, verifying keys, SRS files. Never proving keys."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = zk_dir(cache_dir)

    def find(self, sha256: str) -> Path | None:
        candidates = [*self.root.glob("circuits/*/settings.json"), *self.root.glob("circuits/*/vk.key"),
                      *self.root.glob("srs/*.srs"), *self.root.glob("artifacts/*")]
        for path in candidates:
            if path.name == sha256 or (path.stat().st_size < 64 * 2**20 and _cached_sha256(path) == sha256):
                return path
        return None


    def put(self, sha256: str, data: bytes) -> Path:
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ZkError(f"artifact {sha256[:16]}... does not match its pinned hash")
        path = self.root / "artifacts" / sha256
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


@dataclass(frozen=True)
class VerifierKit:
    """The three files a verifier needs for one shard, each checked against its pin."""

    settings: Path
    vk: Path
    srs: Path


def checked(path: Path, sha256: str, what: str) -> Path:
    actual = sha256_file(path)
    if actual != sha256:
        raise ZkError(f"{what} hash {actual[:16]}... differs from the manifest's {sha256[:16]}...")
    return path


class ProverPool:
    """Proving off the event loop *and* off the GIL: ezkl holds the GIL for whole calls, so
    proofs run in a separate (spawned) process."""

    def __init__(self, workers: int = 1) -> None:
        import concurrent.futures
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        self.executor = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=spawn)
        # witnesses (~20 ms) never queue behind proofs (~1 s): their own process
        self.witness_executor = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn)

    def run(self, circuit: Circuit, values: list[float], workdir: Path) -> dict[str, Any]:
        """Witness and proof. Blocking: call from a worker thread."""
        future = self.executor.submit(run_and_prove, str(circuit.directory), circuit.logrows, str(circuit.srs), values, str(workdir))
        return future.result()

    def witness(self, circuit: Circuit, values: list[float], workdir: Path) -> dict[str, Any]:
        """The circuit's output only (fast). Blocking: call from a worker thread."""
        return self.witness_executor.submit(circuit_witness, str(circuit.directory), values, str(workdir)).result()

    def prove_later(self, circuit: Circuit, witness: str) -> Any:
        """Start proving a witness; returns a concurrent.futures.Future."""
        return self.executor.submit(prove_witness, str(circuit.directory), str(circuit.srs), witness)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.witness_executor.shutdown(wait=False, cancel_futures=True)
