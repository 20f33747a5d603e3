#!/usr/bin/env python
"""Prototype: zero-knowledge proofs (ezkl 23.0.5, KZG/Halo2 on BN254) of two contiguous MLP shards with
chained Poseidon-hashed I/O.

Model: sklearn digits (8x8, /16). embed = Linear(64,32)+ReLU, body = 4 x [Linear(32,32)+ReLU], tail = Linear(32,10).
Proven shards: A = body[0..1], B = body[2..3]; input/output [1,32] float32. embed and tail stay in float.

Chosen configuration (see the report): input/output visibility "hashed", params "fixed",
input_scale = param_scale = 13, scale_rebase_multiplier = 1, decomp_base = 256, decomp_legs = 3 -> logrows 12.

Steps: train -> export (opset 18) -> per shard: gen_settings, calibrate, compile, gen_srs (TEST ONLY), setup ->
chain one sample: gen_witness A, gen_witness B on A's output felts, prove A, prove B, verify both, check hash
equalities -> fidelity on the 450-sample test split -> tampering checks.

usage: .venv/bin/python bench/zk_prototype.py [--out DIR] [--scale 13] [--base 256] [--legs 3] [--reps 5] [--n-fid 450]
"""
import argparse, asyncio, hashlib, json, os, resource, statistics, sys, time, warnings

# ezkl caches range-check tables under $EZKL_REPO_PATH (default ~/.ezkl); keep them next to this script
os.environ.setdefault("EZKL_REPO_PATH", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ezkl_home"))

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
import ezkl

P_BN254 = 21888242871839275222246405745257275088548364400416034343698204186575808495617


# ----------------------------------------------------------------------------------------------- model
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.body = nn.ModuleList([nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(4)])
        self.tail = nn.Linear(32, 10)

    def forward(self, x):
        h = self.embed(x)
        for b in self.body:
            h = b(h)
        return self.tail(h)


SHARDS = {"A": (0, 2), "B": (2, 4)}


def shard(net, name):
    a, b = SHARDS[name]
    return nn.Sequential(*[net.body[i] for i in range(a, b)]).eval()


def train():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    Xt, yt = torch.tensor(Xtr), torch.tensor(ytr)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):  # minibatch 16; full-batch Adam overfits (~94.7% test)
        perm = torch.randperm(len(Xt), generator=g)
        for i in range(0, len(perm), 16):
            idx = perm[i:i + 16]
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()
    return net, Xtr, Xte, ytr, yte


# ----------------------------------------------------------------------------------------------- helpers
def call(f, *a, **k):
    """ezkl 23.0.5 python calls are synchronous; guard anyway in case a version returns an awaitable."""
    r = f(*a, **k)
    return asyncio.run(r) if asyncio.iscoroutine(r) else r


def felt_to_signed(h):  # witness felts: 64 hex chars, little-endian, no 0x
    v = int.from_bytes(bytes.fromhex(h), "little")
    return v - P_BN254 if v > P_BN254 // 2 else v


def rss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def timed(f, *a, **k):
    t = time.perf_counter()
    r = call(f, *a, **k)
    return r, time.perf_counter() - t


def expect_reject(label, fn):
    """verify() raises on a bad proof in ezkl 23 (it does not return False)."""
    try:
        r = fn()
        return dict(case=label, rejected=(r is False), result=str(r))
    except Exception as e:
        return dict(case=label, rejected=True, error=f"{type(e).__name__}: {e}"[:300])


# ----------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "proto_out"))
    ap.add_argument("--scale", type=int, default=13)
    ap.add_argument("--base", type=int, default=256)
    ap.add_argument("--legs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5, help="prove repetitions per shard (verify: 4x this)")
    ap.add_argument("--n-fid", type=int, default=450)
    args = ap.parse_args()
    S = args.scale
    os.makedirs(args.out, exist_ok=True)
    P = lambda *n: os.path.join(args.out, *n)
    report = dict(ezkl=ezkl.__version__, torch=torch.__version__, config=vars(args).copy(),
                  loadavg_start=open("/proc/loadavg").read().split()[:3])
    T0 = time.perf_counter()

    # 1. train
    t = time.perf_counter()
    net, Xtr, Xte, ytr, yte = train()
    with torch.no_grad():
        acc = float((net(torch.tensor(Xte)).argmax(1).numpy() == yte).mean())
    report["train"] = dict(s=round(time.perf_counter() - t, 2), test_acc=round(acc, 4), n_test=len(yte))
    print(f"[train] {report['train']}", flush=True)
    assert acc >= 0.95

    # activations at shard boundaries (float)
    with torch.no_grad():
        acts = {}
        for split, X in (("tr", Xtr), ("te", Xte)):
            h0 = net.embed(torch.tensor(X)); h1 = shard(net, "A")(h0); h2 = shard(net, "B")(h1)
            acts[split] = dict(A=h0, B=h1, out=h2)
    absmax = max(float(acts[s][k].abs().max()) for s in acts for k in ("A", "B", "out"))
    # decomposition range (scale-S integers) must cover every activation: base^legs > absmax * 2^S
    report["range"] = dict(act_absmax=round(absmax, 3), covered=args.base ** args.legs / 2 ** S)
    assert args.base ** args.legs > absmax * 2 ** S * 1.5, "decomp_base**decomp_legs too small for the activations"

    # 2. per shard: export, settings, calibrate, compile, srs, setup
    cfg = {}
    for name in SHARDS:
        d = dict(onnx=P(f"{name}.onnx"), settings=P(f"{name}_settings.json"), cal=P(f"{name}_cal.json"),
                 circuit=P(f"{name}.ezkl"), vk=P(f"{name}_vk.key"), pk=P(f"{name}_pk.key"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # legacy TorchScript exporter warning
            torch.onnx.export(shard(net, name), (torch.zeros(1, 32),), d["onnx"], input_names=["input"],
                              output_names=["output"], opset_version=18, dynamo=False)
        ra = ezkl.PyRunArgs()
        ra.input_visibility, ra.output_visibility, ra.param_visibility = "hashed", "hashed", "fixed"
        ra.input_scale = ra.param_scale = S
        ra.decomp_base, ra.decomp_legs = args.base, args.legs
        # calibration data: training-split activations (flattened; ezkl chunks it into [1,32] samples)
        xtr = acts["tr"][name].numpy()
        order = np.argsort(-np.abs(xtr).max(1))
        cal = xtr[np.concatenate([order[:32], order[-32:]])]
        json.dump({"input_data": [cal.reshape(-1).tolist()]}, open(d["cal"], "w"))
        t = time.perf_counter()
        call(ezkl.gen_settings, d["onnx"], d["settings"], py_run_args=ra)
        call(ezkl.calibrate_settings, d["cal"], d["onnx"], d["settings"], "resources",
             scales=[S], scale_rebase_multiplier=[1])
        st = json.load(open(d["settings"]))
        assert st["model_output_scales"] == [S] and st["model_input_scales"] == [S], st["model_output_scales"]
        call(ezkl.compile_circuit, d["onnx"], d["circuit"], d["settings"])
        t_settings = time.perf_counter() - t
        k = st["run_args"]["logrows"]
        d["srs"] = P(f"kzg{k}.srs")
        if not os.path.exists(d["srs"]):
            _, t_srs = timed(ezkl.gen_srs, d["srs"], k)  # TEST ONLY: random tau; use get_srs (ceremony) in production
            report[f"gen_srs_k{k}_s"] = round(t_srs, 3)
        _, t_setup = timed(ezkl.setup, d["circuit"], d["vk"], d["pk"], d["srs"])
        cfg[name] = d
        report[f"shard_{name}"] = dict(
            logrows=k, num_rows=st["num_rows"], poseidon_rows=st["module_sizes"]["poseidon"][0],
            range_checks=st["required_range_checks"], settings_compile_s=round(t_settings, 2),
            setup_s=round(t_setup, 3), pk_bytes=os.path.getsize(d["pk"]), vk_bytes=os.path.getsize(d["vk"]),
            srs_bytes=os.path.getsize(d["srs"]),
            vk_sha256=hashlib.sha256(open(d["vk"], "rb").read()).hexdigest())
        print(f"[shard {name}] {report[f'shard_{name}']}  rss={rss_mb()}MB", flush=True)

    # 3. chain one test sample: A on the float embed output, B on A's circuit output felts
    x = acts["te"]["A"][0].numpy()
    json.dump({"input_data": [x.tolist()]}, open(P("A_input.json"), "w"))
    wA, tA = timed(ezkl.gen_witness, P("A_input.json"), cfg["A"]["circuit"], P("A_witness.json"))
    json.dump({"input_data": wA["outputs"]}, open(P("B_input.json"), "w"))  # felts: exact, no float round trip
    wB, tB = timed(ezkl.gen_witness, P("B_input.json"), cfg["B"]["circuit"], P("B_witness.json"))
    report["gen_witness_ms"] = dict(A=round(tA * 1e3, 1), B=round(tB * 1e3, 1))

    timings = {}
    for name in SHARDS:
        c = cfg[name]
        pt = [timed(ezkl.prove, P(f"{name}_witness.json"), c["circuit"], c["pk"], P(f"{name}_proof.json"), c["srs"])[1]
              for _ in range(args.reps)]
        vt = []
        for _ in range(4 * args.reps):
            ok, dt = timed(ezkl.verify, P(f"{name}_proof.json"), c["settings"], c["vk"], c["srs"])
            assert ok is True
            vt.append(dt)
        pr = json.load(open(P(f"{name}_proof.json")))
        timings[name] = dict(prove_s_median=round(statistics.median(pt), 3), prove_s_min=round(min(pt), 3),
                             prove_s_all=[round(v, 3) for v in pt],
                             verify_ms_median=round(statistics.median(vt) * 1e3, 1),
                             verify_ms_min=round(min(vt) * 1e3, 1),
                             proof_bytes=len(pr["proof"]), proof_json_bytes=os.path.getsize(P(f"{name}_proof.json")),
                             instances=pr["instances"][0])
        print(f"[prove/verify {name}] {timings[name]}  rss={rss_mb()}MB", flush=True)
    report["timings"] = timings

    # hash checks: proof instances are [H(input), H(output)] (params fixed -> no params hash)
    iA, iB = timings["A"]["instances"], timings["B"]["instances"]
    h_in_indep = ezkl.poseidon_hash([ezkl.float_to_felt(float(v), S, ezkl.PyInputType.F32) for v in x])
    outA_float = [felt_to_signed(f) / 2 ** S for f in wA["outputs"][0]]
    h_outA_indep = ezkl.poseidon_hash([ezkl.float_to_felt(v, S, ezkl.PyInputType.F32) for v in outA_float])
    with torch.no_grad():
        torch_outA = shard(net, "A")(torch.tensor(x)).tolist()
    h_torch = ezkl.poseidon_hash([ezkl.float_to_felt(v, S, ezkl.PyInputType.F32) for v in torch_outA])
    # feeding B the rescaled floats instead of felts must give the same input hash
    json.dump({"input_data": [outA_float]}, open(P("B_input_float.json"), "w"))
    wB2 = call(ezkl.gen_witness, P("B_input_float.json"), cfg["B"]["circuit"], P("B_witness_float.json"))
    report["chain"] = {
        "A.out_hash == B.in_hash (proof instances)": iA[1] == iB[0],
        "A.in_hash == poseidon_hash(float_to_felt(x, S))": h_in_indep[0] == iA[0],
        "A.out_hash == poseidon_hash(float_to_felt(A rescaled out, S))": h_outA_indep[0] == iA[1],
        "A.out_hash == hash of torch float output (expected False)": h_torch[0] == iA[1],
        "B fed rescaled floats: same in_hash": wB2["processed_inputs"]["poseidon_hash"][0] == iB[0],
        "witness processed_outputs == proof instance": wA["processed_outputs"]["poseidon_hash"][0] == iA[1],
    }
    print(f"[chain] {json.dumps(report['chain'], indent=1)}", flush=True)
    assert all(v for k, v in report["chain"].items() if "expected False" not in k)

    # 4. tampering
    def write_tampered(src, dst, fn):
        p = json.load(open(src)); fn(p); json.dump(p, open(dst, "w")); return dst

    def bump_instance(p):  # +1 on the output-hash felt
        v = (int.from_bytes(bytes.fromhex(p["instances"][0][1]), "little") + 1) % P_BN254
        p["instances"][0][1] = v.to_bytes(32, "little").hex()

    def flip(pos):
        def f(p):
            p["proof"][pos] ^= 0x01
            p["hex_proof"] = "0x" + bytes(p["proof"]).hex()
        return f

    def swap_in_B_instances(p):
        p["instances"] = json.load(open(P("B_proof.json")))["instances"]

    A, B = cfg["A"], cfg["B"]
    v = lambda proof, c: call(ezkl.verify, proof, c["settings"], c["vk"], c["srs"])
    tam = [
        expect_reject("A: output-hash instance +1", lambda: v(write_tampered(P("A_proof.json"), P("t1.json"), bump_instance), A)),
        expect_reject("A: bit flip in proof byte 0 (first G1 commitment)", lambda: v(write_tampered(P("A_proof.json"), P("t2.json"), flip(0)), A)),
        expect_reject("A: bit flip in proof byte 3000 (evaluation scalars)", lambda: v(write_tampered(P("A_proof.json"), P("t3.json"), flip(3000)), A)),
        expect_reject("A: bit flip in last proof byte", lambda: v(write_tampered(P("A_proof.json"), P("t4.json"), flip(-1)), A)),
        expect_reject("A's proof against B's vk+settings", lambda: v(P("A_proof.json"), B)),
        expect_reject("A's proof with B's instances", lambda: v(write_tampered(P("A_proof.json"), P("t5.json"), swap_in_B_instances), A)),
    ]
    report["tampering"] = tam
    for r in tam:
        print(f"[tamper] {r}", flush=True)
    assert all(r["rejected"] for r in tam)
    assert v(P("A_proof.json"), A) is True  # untouched proof still verifies

    # 5. fidelity: whole test split through the quantised chain (gen_witness = forward pass)
    n = min(args.n_fid, len(Xte))
    with torch.no_grad():
        pred_float = net(torch.tensor(Xte[:n])).argmax(1).numpy()
    preds, eA, eB, eBl, wt, fails = [], [], [], [], [], []
    for i in range(n):
        json.dump({"input_data": [acts["te"]["A"][i].tolist()]}, open(P("fid_A.json"), "w"))
        try:
            t = time.perf_counter()
            wa = call(ezkl.gen_witness, P("fid_A.json"), A["circuit"], P("fid_A_w.json"))
            json.dump({"input_data": wa["outputs"]}, open(P("fid_B.json"), "w"))
            wb = call(ezkl.gen_witness, P("fid_B.json"), B["circuit"], P("fid_B_w.json"))
            wt.append(time.perf_counter() - t)
        except Exception as e:  # e.g. decomposition range overflow -> "[halo2] General synthesis error"
            fails.append((i, str(e)[:200])); preds.append(-1); continue
        oa = np.array([felt_to_signed(f) for f in wa["outputs"][0]], dtype=np.float64) / 2 ** S
        ob = np.array([felt_to_signed(f) for f in wb["outputs"][0]], dtype=np.float64) / 2 ** S
        with torch.no_grad():
            eA.append(np.abs(oa - acts["te"]["B"][i].numpy()).max())
            eB.append(np.abs(ob - acts["te"]["out"][i].numpy()).max())
            eBl.append(np.abs(ob - shard(net, "B")(torch.tensor(oa, dtype=torch.float32)).numpy()).max())
            preds.append(int(net.tail(torch.tensor(ob, dtype=torch.float32)).argmax()))
    preds = np.array(preds)
    report["fidelity"] = dict(
        n=n, prediction_mismatches=int((preds != pred_float).sum()), failures=fails[:3], n_failures=len(fails),
        acc_float=round(float((pred_float == yte[:n]).mean()), 4), acc_chain=round(float((preds == yte[:n]).mean()), 4),
        max_abs_err_A=float(max(eA)), max_abs_err_B_given_A_circuit=float(max(eBl)),
        max_abs_err_B_chain_vs_float=float(max(eB)),
        absmax_A_out=float(acts["te"]["B"].abs().max()), absmax_B_out=float(acts["te"]["out"].abs().max()),
        gen_witness_pair_ms_median=round(statistics.median(wt) * 1e3, 1))
    print(f"[fidelity] {report['fidelity']}", flush=True)

    report["peak_rss_mb"] = rss_mb()
    report["total_s"] = round(time.perf_counter() - T0, 1)
    json.dump(report, open(P("report.json"), "w"), indent=1)
    print("\n=== SUMMARY ===")
    for name in SHARDS:
        s_, t_ = report[f"shard_{name}"], report["timings"][name]
        print(f"shard {name}: k={s_['logrows']} rows={s_['num_rows']} (poseidon {s_['poseidon_rows']}) "
              f"setup={s_['setup_s']}s prove(median)={t_['prove_s_median']}s verify(median)={t_['verify_ms_median']}ms "
              f"pk={s_['pk_bytes'] / 1e6:.1f}MB vk={s_['vk_bytes']}B proof={t_['proof_bytes']}B")
    f = report["fidelity"]
    print(f"fidelity: {f['prediction_mismatches']}/{f['n']} prediction mismatches, max err A {f['max_abs_err_A']:.2e}, "
          f"B(chain) {f['max_abs_err_B_chain_vs_float']:.2e}; peak RSS {report['peak_rss_mb']} MB; total {report['total_s']} s")
    print(f"report: {P('report.json')}")


if __name__ == "__main__":
    main()
