"""The layering and size rules of docs/architecture.md, checked on the source tree."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "p2p_infer"
SANS_IO_BANNED = {"trio", "libp2p", "torch", "ezkl"}
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 300, 60


def modules(sub: str = "") -> list[Path]:
    return sorted((PACKAGE / sub).rglob("*.py"))


def imported_top_levels(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_proto_is_sans_io():
    """proto/ imports neither trio, libp2p, torch nor ezkl, not even inside a function."""
    offenders = [f"{path.relative_to(PACKAGE)}:{line} imports {name}"
                 for path in modules("proto") for line, name in imported_top_levels(ast.parse(path.read_text()))
                 if name in SANS_IO_BANNED]
    assert modules("proto") and not offenders, offenders


def test_proto_reads_no_clock_or_global_randomness():
    """Time and randomness come in as arguments: no time.time/monotonic, os.urandom or random.* calls."""
    banned = {("time", "time"), ("time", "monotonic"), ("time", "perf_counter"), ("os", "urandom")}
    offenders = []
    for path in modules("proto"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                global_random = node.value.id == "random" and node.attr != "Random"  # a Random handed in is fine
                if (node.value.id, node.attr) in banned or global_random:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not offenders, offenders


def test_proto_imports_nothing_above_it():
    """proto/ may use errors and identity, never ml/, net/, node/, verify/ or testing/."""
    above = {"ml", "net", "node", "verify", "testing", "cli", "config"}
    offenders = []
    for path in modules("proto"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and (node.module or "").split(".")[0] in above:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} from ..{node.module}")
    assert not offenders, offenders


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_oversized_class_or_function(path):
    too_big = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            size = node.end_lineno - node.lineno + 1
            if size > limit:
                too_big.append(f"{node.name}: {size} lines (limit {limit})")
    assert not too_big, too_big


def test_every_error_is_a_p2p_infer_error():
    import inspect

    import p2p_infer.errors as errors

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, Exception)]
    assert classes and all(issubclass(c, errors.P2PInferError) for c in classes)
    defined_elsewhere = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and path.name != "errors.py":
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) or b in {"Withheld", "NoQuorum"} for b in bases):
                    defined_elsewhere.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not defined_elsewhere, defined_elsewhere


def run_python(code: str, *args: str) -> str:
    """``code`` in a fresh interpreter (nothing imported yet); its stdout, stripped."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    return out.stdout.strip()


def test_a_peer_that_serves_no_layers_does_not_import_torch():
    """The bootstrap peer (and any peer before it serves layers) starts without torch: its
    import alone took ~1.5 s of every swarm start (ml/catalog.py)."""
    probe = "import sys, p2p_infer.cli.node, p2p_infer.node.peer; print(sorted(m for m in ('torch', 'ezkl') if m in sys.modules))"
    assert run_python(probe) == "[]"


NO_LAYER_PROBE = """
import sys, trio
from pathlib import Path
from p2p_infer.config import Settings
from p2p_infer.errors import NotServed
from p2p_infer.node.peer import Peer
from p2p_infer.proto.session import StepRequest

peer = Peer(Settings(key=Path(sys.argv[1])))
step = StepRequest("ab" * 16, 0, 0, {"dtype": "float32", "shape": [1, 1, 576], "data": bytes(4 * 576)}).to_wire()
try:
    trio.run(peer.sessions.handle, step)
except NotServed as exc:
    print("refused:", exc.message, "torch" in sys.modules)
"""


def test_a_peer_that_serves_no_layers_refuses_compute_without_loading_torch(tmp_path):
    """A stranger's session step to a bootstrap peer is refused up front: importing torch on
    its event loop blocked it for ~5 s (and then failed as `internal`)."""
    assert run_python(NO_LAYER_PROBE, str(tmp_path / "k.key")) == "refused: this peer serves no layers False"
