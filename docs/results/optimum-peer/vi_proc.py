"""One process: sessions created in the order given, prefill(128) and decode (past 128) steps
interleaved (order alternating per round), 1 thread; prints median ms per graph."""

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

G = {
    "opt": "/work/art/v5/optimum-dense/model.onnx",
    "novi": "/work/art/v5/dense-fp32/model.onnx",
    "vi": "/work/art/dense-fp32/model.onnx",
}
order = sys.argv[1].split(",")
rng = np.random.default_rng(0)
N = 128
ids = rng.integers(0, 49152, size=(1, N), dtype=np.int64)
kv = rng.random((1, 3, N, 64), dtype=np.float32)


def feeds(s, mode):
    f = {}
    for i in s.get_inputs():
        if i.name == "input_ids":
            f[i.name] = ids if mode == "prefill" else ids[:, :1]
        elif i.name == "attention_mask":
            f[i.name] = np.ones((1, N if mode == "prefill" else N + 1), np.int64)
        elif i.name == "position_ids":
            f[i.name] = (
                np.arange(N, dtype=np.int64)[None]
                if mode == "prefill"
                else np.array([[N]], np.int64)
            )
        else:
            f[i.name] = np.zeros((1, 3, 0, 64), np.float32) if mode == "prefill" else kv
    return f


S = {}
for n in order:
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    S[n] = ort.InferenceSession(G[n], o, providers=["CPUExecutionProvider"])
out = []
for mode, R in (("prefill", 14), ("decode", 50)):
    F = {n: feeds(s, mode) for n, s in S.items()}
    T = {n: [] for n in S}
    for r in range(R + 3):
        for n in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            S[n].run(None, F[n])
            T[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(T[n][3:]) * 1e3 for n in S}
    out.append(
        f"{mode}: "
        + " ".join(f"{n} {med[n]:.2f}" for n in order)
        + f" | novi/opt {med['novi'] / med['opt']:.4f} vi/opt {med['vi'] / med['opt']:.4f}"
        + f" novi/vi {med['novi'] / med['vi']:.4f}"
    )
print("order", ",".join(order), " || ".join(out), flush=True)
